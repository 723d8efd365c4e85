"""The typed configuration of an OAPL run: one section per component, composed into :class:`RunConfig`.

Layering is defaults < YAML file < dotted command-line overrides (see :mod:`oapl_megatron.config.loader`).
Cross-field checks that involve more than one section live in :meth:`RunConfig._check_consistency` and
name the fields and the fix; validators never rewrite a user's value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from oapl_megatron.config.base import StrictModel
from oapl_megatron.config.checkpoint import CheckpointConfig
from oapl_megatron.config.code import CodeDatasetTaskConfig, SyntheticCodeTaskConfig
from oapl_megatron.config.data import MathDatasetTaskConfig
from oapl_megatron.config.launch import LaunchConfig
from oapl_megatron.config.loop import ExportConfig, HeldOutEvalConfig, LoggingConfig, LoopConfig
from oapl_megatron.config.profile import ProfileConfig
from oapl_megatron.config.rollout import SYNC_SLACK_S, RolloutConfig, WeightSyncConfig, trainer_wait_bound_s
from oapl_megatron.config.task import SyntheticTaskConfig


class FP8Config(StrictModel):
    """Transformer Engine FP8 settings (GPU only; needs ``model.transformer_impl=transformer_engine``)."""

    enabled: bool = Field(False, description="Run linear layers in FP8 through Transformer Engine.")
    format: Literal["hybrid", "e4m3"] = Field("hybrid", description="hybrid: e4m3 forward, e5m2 backward.")
    recipe: Literal["delayed", "tensorwise", "blockwise"] = Field("delayed", description="Scaling recipe.")
    amax_history_len: int = Field(1024, ge=1, le=65536, description="Delayed scaling: amax history length.")
    amax_compute_algo: Literal["max", "most_recent"] = Field("max", description="Delayed scaling: amax reduction.")
    first_last_layers_bf16: bool = Field(
        False, description="Keep the first/last N layers in bf16 (tensorwise/blockwise recipes only).")
    num_layers_at_start_in_bf16: int = Field(1, ge=0, description="Layers kept in bf16 at the start.")
    num_layers_at_end_in_bf16: int = Field(1, ge=0, description="Layers kept in bf16 at the end.")


    @model_validator(mode="after")
    def _bf16_layers_need_current_scaling(self) -> "FP8Config":
        if self.first_last_layers_bf16 and self.recipe == "delayed":
            raise ValueError(
                "model.fp8.first_last_layers_bf16=true is not supported with model.fp8.recipe=delayed (megatron "
                "keeps bf16 layers only for current-scaling recipes); use recipe=tensorwise or blockwise"
            )
        return self


class ModelConfig(StrictModel):
    """Which policy to build and how its layers are implemented."""

    hf_path: str | None = Field(
        None, description="Directory with a Hugging Face config.json (and weights/tokenizer); None for a built model."
    )
    transformer_impl: Literal["auto", "local", "transformer_engine"] = Field(
        "auto", description="Layer spec: auto = Transformer Engine on GPU when installed, local otherwise."
    )
    params_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Training dtype: auto = fp32 on CPU, bf16 on GPU."
    )
    fp8: FP8Config = Field(default_factory=FP8Config, description="FP8 settings (GPU + Transformer Engine).")
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Attention dropout probability.")
    hidden_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Hidden dropout probability.")
    recompute_activations: bool = Field(False, description="Full activation recomputation (memory for time).")

    @model_validator(mode="after")
    def _fp8_needs_te(self) -> "ModelConfig":
        if self.fp8.enabled and self.transformer_impl == "local":
            raise ValueError(
                "model.fp8.enabled=true needs model.transformer_impl=transformer_engine (or auto on a GPU with "
                "Transformer Engine installed); the local layer spec has no FP8 layers"
            )
        return self


class ParallelConfig(StrictModel):
    """Trainer parallelism. DP is derived: world_size / (tp * pp)."""

    tp: int = Field(1, ge=1, le=64, description="Tensor-parallel size.")
    pp: int = Field(1, ge=1, le=64, description="Pipeline-parallel size.")
    vpp: int | None = Field(None, ge=2, description="Virtual pipeline chunks per stage (interleaved); None = off.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl with CUDA, gloo otherwise.")
    # The default covers a weight sync with the default rollout/weight_sync timeouts (3600 + 2 * 300 + 60 s): the
    # other ranks wait in a collective while rank 0 drains the engines (see config.rollout.trainer_wait_bound_s).
    timeout_s: float = Field(4500.0, gt=0, description="Timeout of every trainer collective, seconds; at least "
                                                      "rollout.request_timeout_s + 2 * weight_sync.timeout_s + 60 "
                                                      "in a run (checked).")

    @model_validator(mode="after")
    def _vpp_needs_pp(self) -> "ParallelConfig":
        if self.vpp is not None and self.pp < 2:
            raise ValueError(f"parallel.vpp={self.vpp} needs parallel.pp >= 2 (got pp={self.pp})")
        return self


class SchedulerConfig(StrictModel):
    """Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``."""

    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    decay_steps: int | None = Field(None, ge=1, description="Cosine decay length; None = the run's total steps.")
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0, description="Final lr as a fraction of optim.lr.")


class OptimConfig(StrictModel):
    """AdamW through megatron-core's (distributed) optimizer."""

    lr: float = Field(1e-6, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    clip_grad: float = Field(1.0, ge=0.0, description="Global gradient-norm clip; 0 disables.")
    distributed: bool = Field(True, description="Shard optimizer state over DP (megatron DistributedOptimizer).")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="LR schedule.")


class OAPLObjective(StrictModel):
    """OAPL: squared regression of beta2 * sequence log-ratio onto the optimal advantage r - V*(x)."""

    type: Literal["oapl"] = "oapl"
    beta1: float = Field(1.0, gt=0, description="Temperature of the soft-max value estimate V*(x).")
    beta2: float = Field(1e-3, gt=0, description="KL strength toward the lagged inference policy.")


class GRPOObjective(StrictModel):
    """GRPO baseline with importance sampling against the (lagged) inference policy."""

    type: Literal["grpo"] = "grpo"
    ratio: Literal["token", "sequence", "truncated"] = Field(
        "token", description="token: clipped PPO ratio per token; sequence: clipped sequence ratio; truncated: TIS."
    )
    clip_eps: float = Field(0.2, gt=0, lt=1.0, description="PPO clip range (token and sequence ratios).")
    tis_cap: float = Field(2.0, ge=1.0, description="Cap of the truncated importance weight.")
    normalize_std: bool = Field(True, description="Divide group advantages by the group std.")


class TrainConfig(StrictModel):
    """Batch geometry and run length."""

    steps: int = Field(100, ge=1, description="Optimizer steps to run.")
    prompts_per_step: int = Field(16, ge=1, description="Prompts per optimizer step (global, over DP).")
    samples_per_prompt: int = Field(8, ge=1, description="G: samples per prompt (the group).")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per micro-batch on one DP rank.")
    seed: int = Field(1234, ge=0, description="Seed of every random generator of the run.")


class RunConfig(StrictModel):
    """The root config: one run of the trainer."""

    run_dir: Path = Field(Path("runs/default"), description="Where logs, metrics and checkpoints go.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Trainer parallelism.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and LR schedule.")
    objective: OAPLObjective | GRPOObjective = Field(
        default_factory=OAPLObjective, discriminator="type", description="Training objective (type: oapl|grpo)."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Batch geometry and run length.")
    task: SyntheticTaskConfig | MathDatasetTaskConfig | CodeDatasetTaskConfig | SyntheticCodeTaskConfig = Field(
        default_factory=SyntheticTaskConfig, discriminator="type",
        description="Prompts and rewards (type: synthetic_arithmetic | math_dataset | code_dataset | synthetic_code).")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="vLLM engines and sampling.")
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig, description="Trainer → engine sync.")
    loop: LoopConfig = Field(default_factory=LoopConfig, description="Lag schedule and rollout buffer.")
    eval: HeldOutEvalConfig = Field(default_factory=HeldOutEvalConfig, description="Held-out evaluation.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics, TensorBoard, progress.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Final Hugging Face export.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Resumable checkpoints.")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="Nodes, GPUs, Slurm (oapl-launch).")
    profile: ProfileConfig = Field(default_factory=ProfileConfig, description="Traces, NVTX ranges, MFU peak.")

    @model_validator(mode="after")
    def _check_consistency(self) -> "RunConfig":
        if self.loop.buffer_groups < self.train.prompts_per_step:
            raise ValueError(
                f"loop.buffer_groups={self.loop.buffer_groups} is smaller than train.prompts_per_step="
                f"{self.train.prompts_per_step}: one step could never be filled; raise loop.buffer_groups"
            )
        if self.checkpoint.every_steps % self.loop.lag:
            raise ValueError(
                f"checkpoint.every_steps={self.checkpoint.every_steps} must be a multiple of loop.lag={self.loop.lag}: "
                "checkpoints are taken right after a weight sync, when the engines' policy equals the trainer's"
            )
        if (self.checkpoint.every_steps or self.checkpoint.resume) and self.loop.buffer != "clear":
            raise ValueError(
                "checkpoint.every_steps / checkpoint.resume need loop.buffer=clear: exact resume relies on every "
                "policy version consuming exactly the groups it generated (loop.buffer=keep is not resumable yet)"
            )
        if self.rollout.logprobs == "tempered" and self.rollout.top_p < 1 and self.loop.ref_logp_source == "engine":
            raise ValueError(
                f"rollout.logprobs=tempered with rollout.top_p={self.rollout.top_p} and loop.ref_logp_source=engine: "
                "the engine's tempered log-probs are renormalised over the top-p nucleus, the trainer's are not, so "
                "log π − log π_vllm would not be 0 at a sync; set loop.ref_logp_source=trainer (π_vllm recomputed "
                "from tempered logits, the OAPL authors' convention), rollout.top_p=1, or rollout.logprobs=raw"
            )
        wait = trainer_wait_bound_s(self.rollout, self.weight_sync)
        if self.parallel.timeout_s < wait:
            raise ValueError(
                f"parallel.timeout_s={self.parallel.timeout_s:g} is shorter than a weight sync may keep the trainer "
                f"ranks waiting: max(rollout.request_timeout_s={self.rollout.request_timeout_s:g}, "
                f"rollout.start_timeout_s={self.rollout.start_timeout_s:g}) + 2 * weight_sync.timeout_s="
                f"{self.weight_sync.timeout_s:g} + {SYNC_SLACK_S:g} = {wait:g} s (rank 0 drains the engines while the "
                f"others wait in the weight gather); raise parallel.timeout_s to at least {wait:g} or lower "
                f"rollout.request_timeout_s"
            )
        if self.launch.gpus_per_node and self.rollout.mode == "local" and self.rollout.devices is not None:
            from oapl_megatron.launch.placement import place_node, trainer_ranks_per_node

            place_node(self.launch.gpus_per_node, trainer_ranks_per_node(self), self.rollout.engines,
                       self.rollout.engine_tp, self.rollout.devices)  # overlap → error now, not at the first sync
        if self.optim.scheduler.warmup_steps > self.train.steps:
            raise ValueError(
                f"optim.scheduler.warmup_steps={self.optim.scheduler.warmup_steps} exceeds "
                f"train.steps={self.train.steps}; lower the warmup"
            )
        return self
