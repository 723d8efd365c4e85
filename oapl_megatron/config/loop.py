"""Config of the OAPL loop: lag schedule, rollout buffer, reference log-probs, evaluation, logging, export."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from oapl_megatron.config.base import StrictModel


class LoopConfig(StrictModel):
    """How generation and training interleave (OAPL Algorithm 1 and its asynchronous variant)."""

    lag: int = Field(50, ge=1, le=100_000, description="L: sync the engines every L optimizer steps (1 ≈ on-policy).")
    buffer: Literal["clear", "keep"] = Field(
        "clear", description="On sync: clear = drop older data (the paper's Algorithm 1); keep = keep up to "
                             "loop.max_staleness versions old.")
    max_staleness: int = Field(0, ge=0, le=1000, description="keep: the oldest allowed data, in policy versions.")
    buffer_groups: int = Field(64, ge=1, le=1_000_000, description="Capacity of the rollout buffer, in groups.")
    generate_prompts: int = Field(16, ge=1, le=100_000, description="Prompts per generation request to the engines.")
    ref_logp_source: Literal["engine", "trainer"] = Field(
        "engine", description="π_vllm log-probs: engine = returned by vLLM (free); trainer = recomputed by the "
                              "trainer from a frozen copy of the last synced weights.")
    wait_timeout_s: float = Field(1800.0, gt=0, description="Longest wait of the trainer for rollout data.")

    @model_validator(mode="after")
    def _keep_needs_staleness(self) -> "LoopConfig":
        if self.buffer == "clear" and self.max_staleness != 0:
            raise ValueError(f"loop.max_staleness={self.max_staleness} has no effect with loop.buffer=clear; set "
                             "loop.buffer=keep or loop.max_staleness=0")
        return self


class HeldOutEvalConfig(StrictModel):
    """Held-out evaluation during training, on vLLM engines.

    ``policy=current`` measures the weights the trainer holds at that step: at a sync point the generation engines
    serve exactly them; between sync points a separate evaluation engine receives the current weights for the
    evaluation only, so the generation engines' lag is untouched. ``policy=served`` measures what the generation
    engines serve (the lagged π_vllm). Each evaluation logs which it measured (``eval_policy``) and the optimizer
    step of the weights (``eval_weights_step``)."""

    every: int = Field(0, ge=0, description="Evaluate every N optimizer steps (and at the start and end); 0 = never.")
    prompts: int = Field(200, ge=1, description="Held-out prompts per evaluation (the first N of the task's list).")
    samples: int = Field(4, ge=1, le=1024, description="Samples per prompt at the rollout temperature (pass@1).")
    greedy: bool = Field(True, description="Also report greedy (temperature 0) accuracy.")
    policy: Literal["current", "served"] = Field(
        "current", description="current = the trainer's weights at that step (an evaluation engine is synced between "
                               "sync points); served = the generation engines' lagged weights.")
    engine_devices: str | None = Field(
        None, description="CUDA_VISIBLE_DEVICES of the evaluation engine (local mode, policy=current); None = the "
                          "trainer's environment (fine on CPU; on GPU give it a GPU of its own).")


class LoggingConfig(StrictModel):
    tensorboard: bool = Field(True, description="Write TensorBoard event files under run_dir/tb.")
    progress: bool = Field(True, description="Show a rich progress bar with ETA (rank 0).")
    log_every: int = Field(1, ge=1, description="Print a metrics line every N steps.")


class ExportConfig(StrictModel):
    final_hf: bool = Field(True, description="Write the final policy in Hugging Face format to run_dir/final_hf.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the exported tensors.")
