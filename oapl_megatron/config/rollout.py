"""Config sections for the inference engines (``rollout``) and the trainer → engine weight sync (``weight_sync``).

To wire into the root config: ``rollout: RolloutConfig = RolloutConfig()`` and
``weight_sync: WeightSyncConfig = WeightSyncConfig()``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from oapl_megatron.config.base import StrictModel


class RolloutConfig(StrictModel):
    """vLLM engines that generate rollouts; each engine is its own process with its own tensor-parallel size."""

    engines: int = Field(1, ge=1, le=1024, description="number of vLLM engines (data-parallel replicas)")
    engine_tp: int = Field(1, ge=1, le=64, description="tensor-parallel size of each engine")
    devices: list[int] | None = Field(
        None, description="local mode on a GPU node: the engines' GPU ids, engine_tp consecutive ids per engine; "
                          "None = the GPUs after the trainer's (see oapl_megatron/launch/placement.py)")
    mode: Literal["local", "cluster"] = Field(
        "local", description="local: the trainer spawns the engines; cluster: attach to engine servers at `addresses`, "
                             "or (no addresses) wait for them to register in <run_dir>/engines/registry")
    addresses: list[str] = Field(
        default_factory=list, description="cluster mode: one `host:port` per engine (engine servers started elsewhere); "
                                          "empty = engines register themselves (oapl-launch slurm)")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    max_tokens: int = Field(1024, ge=1, le=1 << 20, description="maximum generated tokens per completion")
    max_model_len: int = Field(4096, ge=16, le=1 << 22, description="vLLM max_model_len (prompt + completion)")
    kv_cache_bytes: int | None = Field(
        None, ge=1 << 20, description="KV-cache size in bytes per engine (required on CPU; None on GPU = use "
                                      "gpu_memory_utilization)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="engine weight dtype")
    enforce_eager: bool = Field(False, description="disable CUDA graphs / torch.compile in the engine")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=0.99, description="fraction of GPU memory for vLLM")
    seed: int = Field(0, ge=0, description="engine seed")
    start_timeout_s: float = Field(600.0, gt=0, le=7200, description="time an engine may take to start and attach")
    request_timeout_s: float = Field(3600.0, gt=0, description="bound on one generate request to one engine")
    control_timeout_s: float = Field(120.0, gt=0, description="bound on a non-generate control request")

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "cluster" and self.addresses and len(self.addresses) != self.engines:
            raise ValueError(f"rollout.addresses: cluster mode needs one host:port per engine "
                             f"(rollout.engines={self.engines}, got {len(self.addresses)} addresses), or none: the "
                             "engines then register in <run_dir>/engines/registry")
        if self.mode == "local" and self.addresses:
            raise ValueError("rollout.addresses is only used with rollout.mode='cluster'; remove it or set the mode")
        for a in self.addresses:
            host, _, port = a.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"rollout.addresses: {a!r} is not host:port")
        return self


class WeightSyncConfig(StrictModel):
    """How the trainer pushes new weights to the engines (bucketed broadcast over a dedicated group)."""

    bucket_mb: int = Field(256, ge=1, le=8192, description="bucket size in MiB (memory held twice per side)")
    verify_checksums: bool = Field(True, description="per-bucket checksum checked on every receiver before load")
    timeout_s: float = Field(300.0, gt=0, le=7200, description="bound on each data-plane operation and reply")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="data-plane backend; auto = nccl with CUDA, else gloo (nccl on CPU is refused)")
    host: str = Field("127.0.0.1", description="address the trainer's sender listens on (reachable by engines)")
