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
    logprobs: Literal["tempered", "raw"] = Field(
        "tempered", description="which distribution log π and log π_vllm are taken from, on both the trainer and the "
                                "engine side: tempered = log_softmax(logits / temperature), the distribution the "
                                "engines sample from (the OAPL authors' convention; vLLM logprobs_mode="
                                "processed_logprobs); raw = the untempered model (log_softmax(logits)). Identical at "
                                "temperature 1")
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
    # fault tolerance (see rollout/liveness.py and EngineGroup): a dead engine is local to itself
    heartbeat_interval_s: float = Field(1.0, gt=0, le=600, description="seconds between heartbeats to each engine")
    liveness_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="an engine silent for this long (or whose process exited) is declared dead; "
                                         "its in-flight groups are re-issued to the others")
    restart_engines: bool = Field(
        True, description="restart a dead engine in the background (local: respawn on its devices; cluster: "
                          "re-attach to its address) and resync the current weights before it generates again")
    max_restarts: int = Field(10, ge=0, le=10_000, description="restarts per engine before it is left dead")
    restart_timeout_s: float = Field(
        600.0, gt=0, le=7200, description="bound on one restart: respawn + ready, or the wait for a cluster server "
                                          "to come back")
    no_engine_timeout_s: float = Field(
        900.0, gt=0, le=86_400, description="longest time generation waits with no live engine before it fails (the "
                                            "run then stops after a checkpoint at the last sync point)")
    keep_weights_copy: bool = Field(
        True, description="keep a host copy of the last synced weights (one model in trainer rank 0's host memory) so a "
                          "restarted engine gets the current version at once and a sync an engine died in is replayed "
                          "for the others; false = no copy (the sync streams bucket by bucket), a restarted engine "
                          "rejoins at the next sync and an engine death during a sync fails it")

    @property
    def logprob_temperature(self) -> float:
        """The temperature the trainer divides its logits by before the log-softmax (1 for ``logprobs=raw``)."""
        return self.temperature if self.logprobs == "tempered" else 1.0

    @model_validator(mode="after")
    def _check(self):
        if self.logprobs == "tempered" and self.temperature == 0:
            raise ValueError("rollout.logprobs=tempered needs rollout.temperature > 0 (greedy sampling has no "
                             "tempered distribution); set rollout.logprobs=raw or a positive temperature")
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
        if self.heartbeat_interval_s >= self.liveness_timeout_s:
            raise ValueError(f"rollout.heartbeat_interval_s={self.heartbeat_interval_s} must be below "
                             f"rollout.liveness_timeout_s={self.liveness_timeout_s}, or one late beat declares a "
                             "healthy engine dead")
        return self


class WeightSyncConfig(StrictModel):
    """How the trainer pushes new weights to the engines (bucketed broadcast over a dedicated group)."""

    bucket_mb: int = Field(256, ge=1, le=8192, description="bucket size in MiB (memory held twice per side)")
    verify_checksums: bool = Field(True, description="per-bucket checksum checked on every receiver before load")
    timeout_s: float = Field(300.0, gt=0, le=7200, description="bound on each data-plane operation and reply "
                                                               "(see trainer_wait_bound_s for parallel.timeout_s)")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="data-plane backend; auto = nccl with CUDA, else gloo (nccl on CPU is refused)")
    host: str = Field("127.0.0.1", description="address the trainer's sender listens on (reachable by engines)")


# Slack for the control-plane round trips around a sync (meta, verify and commit replies, the prefix-cache reset).
SYNC_SLACK_S = 60.0


def trainer_wait_bound_s(rollout: RolloutConfig, weight_sync: WeightSyncConfig) -> float:
    """The longest a trainer rank other than 0 may wait in one collective with rank 0 during a weight sync.

    While the others wait in the weight gather, rank 0 first waits for the engines: draining in-flight generation
    (≤ ``rollout.request_timeout_s``), or starting the evaluation engine (≤ ``rollout.start_timeout_s``); then
    the weight group's join and one data-plane operation (≤ ``weight_sync.timeout_s`` each), plus slack for the
    control replies. ``parallel.timeout_s`` (every trainer collective) must be at least this, or the waiting
    ranks time out while rank 0 is still legitimately busy (RunConfig checks it).
    """
    engine_wait = max(rollout.request_timeout_s, rollout.start_timeout_s)
    return engine_wait + 2 * weight_sync.timeout_s + SYNC_SLACK_S
