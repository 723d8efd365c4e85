"""Typed configs of the prompt data and the math reward: :class:`DatasetConfig` and :class:`MathRewardConfig`
(``oapl-eval``'s run config, which uses both, is :mod:`oapl_megatron.config.offline_eval`).

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


class MathDatasetTaskConfig(StrictModel):
    """The ``task:`` section for math problems from a dataset (``type: math_dataset``), scored with math-verify."""

    type: Literal["math_dataset"] = "math_dataset"
    data: DatasetConfig = Field(..., description="Training problems (need a prompt and an answer field).")
    eval_data: DatasetConfig | None = Field(None, description="Held-out problems; None = no in-training eval.")
    reward: MathRewardConfig = Field(default_factory=MathRewardConfig, description="Answer extraction and checks.")
