"""Typed configs of the code tasks (the ``task:`` section) and of the reward pool that scores them.

    task:
      type: code_dataset                   # LiveCodeBench / DeepCoder / TACO rows from local jsonl/parquet
      data: {source: [train.jsonl], fields: {prompt: problem, tests: tests, answer: null}}
      fields: {starter_code: starter_code, metadata: metadata}
      reward: {partial_credit: false, stop_on_first_failure: true, program_timeout_s: 60}
      reward_pool: {workers: null}        # null = one scoring thread per core

    task:
      type: synthetic_code                 # the CPU demo: a one-line program that prints the asked-for value

:class:`CodeDatasetTaskConfig` is consumed by :mod:`oapl_megatron.tasks.code_dataset`,
:class:`SyntheticCodeTaskConfig` by :mod:`oapl_megatron.tasks.synthetic_code`, :class:`RewardPoolConfig` by
:mod:`oapl_megatron.tasks.reward_pool`.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from oapl_megatron.config.base import StrictModel
from oapl_megatron.config.data import DatasetConfig
from oapl_megatron.config.sandbox import CodeRewardConfig, SandboxConfig

#: LiveCodeBench's wording for functional problems (the model completes the given starter code).
STARTER_CODE_TEMPLATE = (
    "You will use the following starter code to write the solution to the problem and enclose your code within "
    "delimiters.\n```python\n{starter_code}\n```"
)


class RewardPoolConfig(StrictModel):
    """Scoring threads that run rewards (sandboxed programs) while the engines generate and the trainer trains."""

    workers: int | None = Field(
        None, ge=1, le=256,
        description="Responses scored at once (each a thread that runs sandboxed programs); None = os.cpu_count().",
    )

    def resolved_workers(self) -> int:
        """``workers``, or the machine's cores when unset."""
        return self.workers if self.workers is not None else max(1, os.cpu_count() or 1)


class CodeFields(StrictModel):
    """Row fields of a code dataset beyond ``data.fields`` (prompt, tests, id). ``None`` = not used."""

    starter_code: str | None = Field(
        None, min_length=1,
        description="Field with starter code (LiveCodeBench/TACO 'starter_code'); null or empty = none for that row.")
    fn_name: str | None = Field(
        None, min_length=1, description="Field with the function name of call-based tests (APPS/TACO style).")
    metadata: str | None = Field(
        None, min_length=1,
        description="Field with a JSON object (or its text) holding 'func_name' (LiveCodeBench/DeepCoder style).")


class CodeScoringConfig(StrictModel):
    """How code rows are read, shown and scored outside training (``oapl-eval --task code``): the same settings,
    with the same defaults, as the ``code_dataset`` task's ``fields``, ``starter_code_template``, ``require_fence``
    and ``reward``."""

    fields: CodeFields = Field(default_factory=CodeFields, description="Starter code / function name fields.")
    starter_code_template: str = Field(
        STARTER_CODE_TEMPLATE,
        description="Appended to the problem when a row has starter code; must contain '{starter_code}'.")
    require_fence: bool = Field(
        True, description="Only code in a fenced block counts; a response without one scores 0 as 'no_code'.")
    reward: CodeRewardConfig = Field(default_factory=CodeRewardConfig, description="Test running and scoring.")

    @model_validator(mode="after")
    def _check(self) -> "CodeScoringConfig":
        if "{starter_code}" not in self.starter_code_template:
            raise ValueError("starter_code_template must contain '{starter_code}'")
        return self


class CodeDatasetTaskConfig(CodeScoringConfig):
    """The ``task:`` section for programming problems from a dataset (``type: code_dataset``), scored by running
    the response's program against the row's tests in the sandbox (``fields``, ``starter_code_template``,
    ``require_fence`` and ``reward`` come from :class:`CodeScoringConfig`, which ``oapl-eval`` shares)."""

    type: Literal["code_dataset"] = "code_dataset"
    data: DatasetConfig = Field(..., description="Training problems (need a prompt and a tests field).")
    eval_data: DatasetConfig | None = Field(None, description="Held-out problems; None = no in-training eval.")
    reward_pool: RewardPoolConfig = Field(default_factory=RewardPoolConfig, description="Scoring threads.")

    @model_validator(mode="after")
    def _check_data(self) -> "CodeDatasetTaskConfig":
        for name, d in (("data", self.data), ("eval_data", self.eval_data)):
            if d is None:
                continue
            if d.fields.tests is None:
                raise ValueError(f"task.{name}.fields.tests is null: the code task needs a tests field")
            if d.fields.answer is not None:
                raise ValueError(
                    f"task.{name}.fields.answer={d.fields.answer!r}: code rows are scored by their tests, not an "
                    f"answer; set task.{name}.fields.answer: null")
        return self


def _demo_sandbox() -> SandboxConfig:
    # A one-line program needs milliseconds; tight limits keep a hostile or looping sample cheap.
    return SandboxConfig(wall_timeout_s=5.0, cpu_time_s=2, memory_bytes=256 * 2**20, max_stdout_bytes=64 * 1024,
                         max_processes=16)


class SyntheticCodeTaskConfig(StrictModel):
    """One-line Python programs that print an asked-for value (``type: synthetic_code``), the task of the CPU code
    demo. A prompt names an operation on small integers (``sum``, ``max``, ``min``, ``mul``, ``sub``); the program
    must print its value; the reward runs the program in the sandbox and compares what it printed."""

    type: Literal["synthetic_code"] = "synthetic_code"
    operations: str = Field(
        "sum,max,min,sub", pattern=r"^(sum|max|min|mul|sub)(,(sum|max|min|mul|sub))*$",
        description="Comma-separated operations to draw from: sum, max, min, mul, sub (left to right).")
    min_args: int = Field(2, ge=2, le=8, description="Fewest operands of a problem.")
    max_args: int = Field(4, ge=2, le=8, description="Most operands of a problem.")
    max_value: int = Field(99, ge=9, le=10**6, description="Operands are drawn from 0..max_value.")
    eval_size: int = Field(400, ge=1, le=100_000, description="Held-out evaluation prompts (never trained on).")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of the problem space kept for evaluation.")
    seed: int = Field(0, ge=0, description="Seed of the evaluation set and base seed of the training streams.")
    sft_size: int = Field(3000, ge=1, le=10_000_000, description="Solutions for the supervised warm start.")
    sft_noise_frac: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Fraction of warm-start solutions with one mistake (a wrong operand, function or a syntax slip).")
    reward: CodeRewardConfig = Field(
        default_factory=lambda: CodeRewardConfig(num_workers=1, sandbox=_demo_sandbox()),
        description="How each program is run (one test: its stdout against the value).")
    reward_pool: RewardPoolConfig = Field(default_factory=RewardPoolConfig, description="Scoring threads.")

    @model_validator(mode="after")
    def _check(self) -> "SyntheticCodeTaskConfig":
        if self.min_args > self.max_args:
            raise ValueError(f"task.min_args={self.min_args} exceeds task.max_args={self.max_args}")
        return self
