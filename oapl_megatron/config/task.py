"""Typed config of the training task (the ``task:`` section). One class per task type, discriminated by ``type``.

    task:
      type: synthetic_arithmetic
      min_terms: 2
      max_terms: 3
      max_digits: 3
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from oapl_megatron.config.base import StrictModel


class SyntheticTaskConfig(StrictModel):
    """Multi-step integer arithmetic ``a+b-c=`` with worked partial sums and a final ``#answer`` line.

    Difficulty grows with the number of terms (more steps to get right) and digits (more carries).
    """

    type: Literal["synthetic_arithmetic"] = "synthetic_arithmetic"
    min_terms: int = Field(2, ge=2, le=16, description="Fewest operands in a problem (≥ 2: at least one step).")
    max_terms: int = Field(3, ge=2, le=16, description="Most operands in a problem.")
    min_digits: int = Field(1, ge=1, le=9, description="Fewest digits of an operand.")
    max_digits: int = Field(3, ge=1, le=9, description="Most digits of an operand.")
    operators: str = Field(
        "+", pattern=r"^(\+|-|\+-|-\+)$",
        description="Operators to draw from: '+', '-' or '+-' (evaluated left to right; answers may be negative).",
    )
    eval_size: int = Field(1000, ge=1, le=1_000_000, description="Held-out evaluation prompts (never trained on).")
    eval_fraction: float = Field(
        0.1, gt=0.0, lt=1.0,
        description="Share of the problem space reserved for evaluation (chosen by a hash of the problem text).",
    )
    seed: int = Field(0, ge=0, description="Seed of the evaluation set and base seed of the training streams.")
    sft_size: int = Field(3000, ge=1, le=10_000_000, description="Worked solutions for the supervised warm start.")
    sft_corrupt_frac: float = Field(
        0.2, ge=0.0, le=1.0,
        description="Fraction of warm-start solutions with one corrupted digit (gives pass@k ≫ pass@1 headroom).",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> "SyntheticTaskConfig":
        if self.min_terms > self.max_terms:
            raise ValueError(f"task.min_terms={self.min_terms} exceeds task.max_terms={self.max_terms}")
        if self.min_digits > self.max_digits:
            raise ValueError(f"task.min_digits={self.min_digits} exceeds task.max_digits={self.max_digits}")
        expected_eval = self.problem_space_size() * self.eval_fraction
        if self.eval_size > 0.5 * expected_eval:
            raise ValueError(
                f"task.eval_size={self.eval_size} is too large for the problem space: about {expected_eval:.0f} "
                f"problems fall in the eval split (task.eval_fraction={self.eval_fraction} of "
                f"{self.problem_space_size()}); lower task.eval_size to at most {int(0.5 * expected_eval)} or "
                "raise task.max_terms / task.max_digits / task.eval_fraction"
            )
        return self

    def problem_space_size(self) -> int:
        """Number of distinct problems the knobs allow (operands × operator choices, over all term counts)."""
        lo = 0 if self.min_digits == 1 else 10 ** (self.min_digits - 1)
        operands = 10**self.max_digits - lo
        ops = len(self.operators)
        return sum(operands**k * ops ** (k - 1) for k in range(self.min_terms, self.max_terms + 1))
