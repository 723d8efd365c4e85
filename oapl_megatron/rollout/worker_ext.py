"""vLLM worker extension: the receiving end of weight sync, inside every vLLM worker.

Passed to vLLM as ``LLM(..., worker_extension_cls="oapl_megatron.rollout.worker_ext.WeightSyncWorkerExtension")``;
vLLM mixes it into its worker class, and the engine server calls the methods with ``llm.collective_rpc(name,
args=...)`` on every worker of the engine (all TP ranks). Only metadata crosses the RPC (in multiprocess vLLM,
tensors in RPC arguments do not survive); tensor data arrives over the weight group.

Staging (all-or-nothing: nothing is loaded before every engine verified every bucket): by default ("host") a
worker keeps at most ``buckets_in_flight`` buckets on its GPU (outside vLLM's memory budget), checksums each there
and copies it into a pinned host buffer that holds the verified model until the commit; the commit then loads
tensor by tensor (each moved to the GPU just before vLLM copies it in), so the extra GPU memory of a sync is a
few buckets, not a model. ``staging="device"`` keeps the whole model on the GPU instead. On CPU both are one
buffer in host memory.

Loading goes through the worker's own ``reload_weights`` (layerwise, in place, full HF-named tensors; vLLM shards
them to its own TP), via :mod:`oapl_megatron.rollout.vllm_compat`, which pins the vLLM internals we use.
"""

from __future__ import annotations

import time


from oapl_megatron.rollout import vllm_compat
from oapl_megatron.weight_sync.sync import SyncMeta, receive_weights
from oapl_megatron.weight_sync.transport import WeightGroup, make_receiver


class WeightSyncWorkerExtension:
    """Methods prefixed ``oapl_`` to stay clear of vLLM's own worker attributes."""

    def oapl_init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                               timeout_s: float) -> int:
        """Join the weight group as rank ``rank_offset + <this worker's rank in the engine>``; returns it."""
        vllm_compat.check_vllm_version()
        self.oapl_close_weight_group()
        rank = rank_offset + vllm_compat.worker_rank(self)
        self._oapl_group = WeightGroup.join(host, port, rank, world_size, backend, timeout_s)
        self._oapl_receiver = make_receiver(self._oapl_group)
        self._oapl_staged = None
        return rank

    def oapl_receive_weights(self, meta: dict) -> dict:
        """Receive and verify every bucket; stage the tensors (nothing is loaded). Blocks for the broadcast.

        ``meta`` is ``dataclasses.asdict(SyncMeta)``: plain containers survive vLLM's RPC serialization."""
        meta = SyncMeta(**meta)
        receiver = getattr(self, "_oapl_receiver", None)
        if receiver is None:
            raise RuntimeError("receive_weights before init_weight_group")
        self._oapl_staged = None
        device = receiver.group.device
        if meta.staging == "host" and device.type != "cpu":
            staged, stats = receive_weights(receiver, meta, staging_device="cpu",
                                            buckets_in_flight=meta.buckets_in_flight)
        else:
            staged, stats = receive_weights(receiver, meta)
        self._oapl_staged = staged
        return {"receive_s": stats.receive_s, "verify_s": stats.verify_s, "bytes": stats.bytes,
                "device_buffers": stats.device_buffers}

    def oapl_commit_weights(self) -> dict:
        """Load the staged tensors in place (one layerwise reload) and drop them."""
        staged = getattr(self, "_oapl_staged", None)
        if staged is None:
            raise RuntimeError("commit_weights without verified staged weights")
        self._oapl_staged = None
        device = vllm_compat.worker_device(self)  # the model's device (a gloo group delivers to host memory)
        t0 = time.perf_counter()
        # host-staged tensors go to the GPU one at a time, as vLLM asks for them (a no-op when already there)
        vllm_compat.reload_weights(self, ((name, t.to(device, non_blocking=True)) for name, t in staged))
        return {"load_s": time.perf_counter() - t0}

    def oapl_abort_weights(self) -> None:
        self._oapl_staged = None

    def oapl_close_weight_group(self) -> None:
        group = getattr(self, "_oapl_group", None)
        if group is not None:
            group.close()
        self._oapl_group = None
        self._oapl_receiver = None
        self._oapl_staged = None
