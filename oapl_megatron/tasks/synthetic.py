"""Synthetic multi-step arithmetic with a verifiable reward: the task of the CPU demo.

A prompt is a chain of integer operands, evaluated left to right; the expected completion writes one partial
result per line and ends with ``#<answer>``::

    prompt:      "12+345+6=\\n"
    completion:  "12+345=357\\n357+6=363\\n#363</s>"

The reward is 1 only when the last line is exactly ``#<answer>`` and is followed by EOS with nothing after it;
the worked lines are not graded (right answer after a slip in a partial sum still scores 1).

    task = SyntheticArithmeticTask(SyntheticTaskConfig(max_terms=3, max_digits=3))
    stream = task.train_prompts(seed=0)            # endless, deterministic, never an eval problem
    evals = task.eval_prompts()                    # task.config.eval_size fixed problems
    sft = task.sft_examples(3000, seed=0, corrupt_frac=0.2)   # warm-start data, 20% with one wrong digit

Train and eval are disjoint by construction: a problem belongs to the eval split iff a hash of its text falls in
the first ``eval_fraction`` of the hash range, whatever the seed. Randomness comes from ``random.Random`` seeded
with strings (hashed with SHA-512 by Python), so streams are identical across runs, processes and machines.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Iterator

from oapl_megatron.config.task import SyntheticTaskConfig
from oapl_megatron.tasks.base import GeneratedTask, Prompt, RewardResult
from oapl_megatron.tasks.tokenizer import EOS

_ANSWER_LINE = re.compile(r"#(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """``terms[0] ops[0] terms[1] ops[1] ...``, evaluated left to right (``len(ops) == len(terms) − 1``)."""

    terms: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def expression(self) -> str:
        out = str(self.terms[0])
        for op, t in zip(self.ops, self.terms[1:]):
            out += f"{op}{t}"
        return out

    def steps(self, first_wrong: tuple[int, int] | None = None) -> list[tuple[int, str, int, int]]:
        """[(left, op, right, result)] one per operator. ``first_wrong=(k, value)`` replaces the result of step k
        by ``value`` and carries it into the following steps (a computation slip)."""
        acc = self.terms[0]
        out = []
        for k, (op, t) in enumerate(zip(self.ops, self.terms[1:])):
            res = acc + t if op == "+" else acc - t
            if first_wrong is not None and first_wrong[0] == k:
                res = first_wrong[1]
            out.append((acc, op, t, res))
            acc = res
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]


def render_prompt(problem: Problem) -> str:
    return f"{problem.expression}=\n"


def render_solution(steps: list[tuple[int, str, int, int]]) -> str:
    """The worked completion without EOS: one ``left op right=result`` line per step, then ``#result``."""
    lines = [f"{left}{op}{right}={res}" for left, op, right, res in steps]
    return "\n".join(lines) + f"\n#{steps[-1][3]}"


def _digest(expression: str) -> bytes:
    return hashlib.sha256(expression.encode()).digest()


@dataclass(frozen=True)
class SFTExample:
    """A warm-start example: ``prompt.text + completion`` followed by EOS; ``corrupted`` marks a planted slip."""

    prompt: Prompt
    completion: str
    corrupted: bool


class SyntheticArithmeticTask(GeneratedTask):
    """The synthetic arithmetic task (see the module docstring). ``eos_text`` is the EOS string the reward expects
    at the end of a response (the character tokenizer's ``</s>``)."""

    def __init__(self, config: SyntheticTaskConfig, eos_text: str = EOS) -> None:
        if not eos_text:
            raise ValueError("eos_text must be a non-empty string (the tokenizer's EOS token text)")
        self.config = config
        self.eos_text = eos_text

    # -- problems --------------------------------------------------------------------------------------------------

    def is_eval_problem(self, expression: str) -> bool:
        """True iff ``expression`` (e.g. ``"12+345+6"``) belongs to the held-out split (hash bucket)."""
        bucket = int.from_bytes(_digest(expression)[:8], "big") / 2.0**64  # uniform in [0, 1)
        return bucket < self.config.eval_fraction

    def _sample_problem(self, rng: random.Random) -> Problem:
        c = self.config
        n = rng.randint(c.min_terms, c.max_terms)
        terms = []
        for _ in range(n):
            # Draw the digit count first, so that short operands are not vanishingly rare among long ones.
            d = rng.randint(c.min_digits, c.max_digits)
            terms.append(rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1))
        ops = tuple(rng.choice(c.operators) for _ in range(n - 1))
        return Problem(tuple(terms), ops)

    def _prompt(self, problem: Problem, split: str) -> Prompt:
        expr = problem.expression
        return Prompt(
            id=f"arith-{_digest(expr).hex()[:16]}",
            text=render_prompt(problem),
            answer=str(problem.answer),
            meta={"split": split, "terms": list(problem.terms), "ops": list(problem.ops)},
        )

    def _problems(self, stream: str, split: str) -> Iterator[Problem]:
        rng = random.Random(f"synthetic_arithmetic:{stream}")
        want_eval = split == "eval"
        while True:
            p = self._sample_problem(rng)
            if self.is_eval_problem(p.expression) == want_eval:
                yield p

    EVAL_HINT = "lower task.eval_size or widen task.max_terms/max_digits"

    @staticmethod
    def _eval_key(p) -> str:
        return p.expression

    def reward(self, prompt: Prompt, response_text: str) -> RewardResult:
        """1.0 iff the response ends with ``#<answer>`` + EOS and nothing else after it; else 0.0.

        ``info``: ``reason`` (ok | no_eos | text_after_eos | no_answer_line | wrong_answer), ``parsed`` (the
        answer string read from the last line or None) and ``has_eos``.
        """
        eos = self.eos_text
        has_eos = response_text.endswith(eos)
        body = response_text[: -len(eos)] if has_eos else response_text
        last_line = body.rsplit("\n", 1)[-1]
        m = _ANSWER_LINE.fullmatch(last_line)
        parsed = m.group(1) if m else None
        if not has_eos:
            reason = "no_eos"  # cut at the length limit, or text generated past the answer
        elif eos in body:
            reason = "text_after_eos"
        elif parsed is None:
            reason = "no_answer_line"  # includes trailing garbage such as "#363 " or "#363\nabc"
        elif parsed != prompt.answer:
            reason = "wrong_answer"  # exact string match: "#0363" is wrong for 363
        else:
            reason = "ok"
        return RewardResult(1.0 if reason == "ok" else 0.0, {"reason": reason, "parsed": parsed, "has_eos": has_eos})

    # -- supervised warm start -------------------------------------------------------------------------------------

    def solution(self, prompt: Prompt) -> str:
        """The correct worked completion of a prompt from this task (without EOS)."""
        return render_solution(Problem(tuple(prompt.meta["terms"]), tuple(prompt.meta["ops"])).steps())

    def sft_examples(self, n: int, seed: int, corrupt_frac: float | None = None) -> list[SFTExample]:
        """``n`` worked solutions of training-split problems; a ``corrupt_frac`` share (default
        ``config.sft_corrupt_frac``) carries one wrong digit in one partial result, carried through to a wrong
        final answer, so a model fit to them keeps making slips that sampling can avoid (pass@k ≫ pass@1).

        Which examples are corrupted is exact: ``round(n * corrupt_frac)`` of them, at random positions.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}")
        frac = self.config.sft_corrupt_frac if corrupt_frac is None else corrupt_frac
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"corrupt_frac must be in [0, 1]; got {frac}")
        out = []
        for p, noisy, rng in self._noisy_draws("synthetic_arithmetic", n, frac, seed):
            steps = p.steps()
            if noisy:
                k = rng.randrange(len(steps))
                steps = p.steps(first_wrong=(k, _corrupt_one_digit(steps[k][3], rng)))
            out.append(SFTExample(self._prompt(p, "train"), render_solution(steps), noisy))
        return out

    def max_response_tokens(self) -> int:
        """Upper bound on the characters (= tokens of the character tokenizer) of a correct completion, EOS
        included; use it as the generation length limit."""
        c = self.config
        biggest = c.max_terms * (10**c.max_digits - 1)
        width = len(str(biggest)) + 1  # + sign
        line = 3 * width + 3  # left op right = result \n
        return (c.max_terms - 1) * line + 1 + width + 1


def _corrupt_one_digit(value: int, rng: random.Random) -> int:
    """``value`` with one decimal digit replaced by a different one (never a new leading zero)."""
    sign = "-" if value < 0 else ""
    digits = list(str(abs(value)))
    pos = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[pos] and not (pos == 0 and len(digits) > 1 and d == "0")]
    digits[pos] = rng.choice(choices)
    return int(sign + "".join(digits))
