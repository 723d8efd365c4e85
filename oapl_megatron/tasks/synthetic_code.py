"""Synthetic code task: write a one-line Python program that prints the value asked for; the task of the CPU code
demo. Every reward runs the program in the sandbox.

A prompt names an operation on small integers; the expected completion is a one-line program::

    prompt:      "max 12 7 40\\n"
    completion:  "print(max(12,7,40))</s>"          # sum → print(a+b+c), sub → print(a-b-c), mul → print(a*b*c)

The reward runs the completion (EOS removed) as a program through :func:`oapl_megatron.tasks.code_reward.code_reward`
with one stdin/stdout test (empty input, the value as output): 1.0 when it ends with EOS and prints the value,
else 0.0. Any program that prints the value scores 1 (``print(40)`` too); a completion cut at the length limit
(no EOS) is not run and scores 0.

    task = SyntheticCodeTask(SyntheticCodeTaskConfig())
    stream = task.train_prompts(seed=0)                # endless, deterministic, never an eval problem
    sft = task.sft_examples(3000, seed=0)              # warm-start data; sft_noise_frac of it with one mistake

Train and eval are disjoint by a hash of the problem text (as in :mod:`oapl_megatron.tasks.synthetic`); streams
are seeded with strings, so they are identical across runs, processes and machines.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from oapl_megatron.config.code import SyntheticCodeTaskConfig
from oapl_megatron.tasks.base import GeneratedTask, Prompt, RewardResult
from oapl_megatron.tasks.tokenizer import EOS

#: Characters of the character tokenizer for code tasks: enough for the demo's programs and for one-line
#: hostile programs in tests ('/' is excluded by the tokenizer, so paths are spelled with chr(47)).
CODE_ALPHABET = "0123456789+-*=,.:;()[]'\"_ \n#abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

_CALLS = {"max": "max", "min": "min"}
_INFIX = {"sum": "+", "sub": "-", "mul": "*"}


@dataclass(frozen=True)
class CodeProblem:
    op: str
    args: tuple[int, ...]

    @property
    def text(self) -> str:
        return f"{self.op} " + " ".join(map(str, self.args))

    @property
    def value(self) -> int:
        if self.op == "sum":
            return sum(self.args)
        if self.op == "mul":
            return math.prod(self.args)
        if self.op == "sub":
            return self.args[0] - sum(self.args[1:])
        return max(self.args) if self.op == "max" else min(self.args)


def render_program(op: str, args: tuple[int, ...] | list[str]) -> str:
    """The one-line program for ``op`` over ``args`` (operands as numbers or already-rendered strings)."""
    parts = [str(a) for a in args]
    if op in _CALLS:
        return f"print({_CALLS[op]}({','.join(parts)}))"
    return f"print({_INFIX[op].join(parts)})"


@dataclass(frozen=True)
class SFTExample:
    """A warm-start example: ``prompt.text + completion`` followed by EOS; ``mistake`` names a planted error."""

    prompt: Prompt
    completion: str
    mistake: str | None


def _digest(text: str) -> bytes:
    return hashlib.sha256(("synthetic_code:" + text).encode()).digest()


class SyntheticCodeTask(GeneratedTask):
    """The synthetic code task (module docstring). ``eos_text`` is the EOS string a finished completion ends with."""

    def __init__(self, config: SyntheticCodeTaskConfig, eos_text: str = EOS) -> None:
        if not eos_text:
            raise ValueError("eos_text must be a non-empty string (the tokenizer's EOS token text)")
        self.config = config
        self.eos_text = eos_text
        self.ops = tuple(config.operations.split(","))

    @property
    def reward_workers(self) -> int:
        """Scoring threads of the reward pool (``task.reward_pool.workers``, default the cores)."""
        return self.config.reward_pool.resolved_workers()

    # -- problems --------------------------------------------------------------------------------------------------

    def is_eval_problem(self, text: str) -> bool:
        return int.from_bytes(_digest(text)[:8], "big") / 2.0**64 < self.config.eval_fraction

    def _sample(self, rng: random.Random) -> CodeProblem:
        c = self.config
        n = rng.randint(c.min_args, c.max_args)
        # Draw the digit count first so that one-digit operands are not rare among two-digit ones.
        width = len(str(c.max_value))
        args = []
        for _ in range(n):
            d = rng.randint(1, width)
            hi = min(c.max_value, 10**d - 1)
            args.append(rng.randint(0 if d == 1 else 10 ** (d - 1), hi))
        return CodeProblem(rng.choice(self.ops), tuple(args))

    def _problems(self, stream: str, split: str) -> Iterator[CodeProblem]:
        rng = random.Random(f"synthetic_code:{stream}")
        while True:
            p = self._sample(rng)
            if self.is_eval_problem(p.text) == (split == "eval"):
                yield p

    def _prompt(self, p: CodeProblem, split: str) -> Prompt:
        return Prompt(id=f"code-{_digest(p.text).hex()[:16]}", text=p.text + "\n", answer=str(p.value),
                      meta={"split": split, "op": p.op, "args": list(p.args)})

    EVAL_HINT = "lower task.eval_size or raise task.max_value / task.max_args"

    @staticmethod
    def _eval_key(p) -> str:
        return p.text

    def reward(self, prompt: Prompt, response_text: str) -> RewardResult:
        """Run the program in the sandbox; ``info``: ``reason`` (passed | no_eos | text_after_eos | no_code | the
        sandbox verdict: wrong_answer, runtime_error, timeout, memory_limit, process_limit, ...) and
        ``sandbox_runs`` (programs run for this response: 0 or 1)."""
        from oapl_megatron.tasks.code_reward import code_reward

        eos = self.eos_text
        if not response_text.endswith(eos):
            return RewardResult(0.0, {"reason": "no_eos", "sandbox_runs": 0})
        program = response_text[: -len(eos)]
        if eos in program:
            return RewardResult(0.0, {"reason": "text_after_eos", "sandbox_runs": 0})
        if not program.strip():
            return RewardResult(0.0, {"reason": "no_code", "sandbox_runs": 0})
        out = code_reward(program, {"inputs": [""], "outputs": [prompt.answer + "\n"]}, self.config.reward)
        reason = "passed" if out["error"] is None else out["error"].split(": ", 1)[-1]
        return RewardResult(float(out["reward"]), {"reason": reason, "sandbox_runs": len(out["details"])})

    # -- supervised warm start -------------------------------------------------------------------------------------

    def solution(self, prompt: Prompt) -> str:
        return render_program(prompt.meta["op"], tuple(prompt.meta["args"]))

    def sft_examples(self, n: int, seed: int, noise_frac: float | None = None) -> list[SFTExample]:
        """``n`` solutions of training problems; exactly ``round(n * noise_frac)`` (default
        ``config.sft_noise_frac``) carry one mistake: a wrong digit in an operand, the wrong function or operator,
        or a syntax slip (a missing parenthesis). A model fit to them keeps making mistakes that sampling can
        avoid, which RL then removes (pass@k ≫ pass@1)."""
        frac = self.config.sft_noise_frac if noise_frac is None else noise_frac
        if n < 0 or not 0.0 <= frac <= 1.0:
            raise ValueError(f"sft_examples: need n >= 0 and noise_frac in [0, 1]; got n={n}, noise_frac={frac}")
        out = []
        for p, noisy, rng in self._noisy_draws("synthetic_code", n, frac, seed):
            completion, mistake = _with_mistake(p, rng) if noisy else (render_program(p.op, p.args), None)
            out.append(SFTExample(self._prompt(p, "train"), completion, mistake))
        return out

    def max_response_tokens(self) -> int:
        """Characters (= tokens of the character tokenizer) of the longest correct completion, EOS included."""
        c = self.config
        return len("print(max())") + c.max_args * (len(str(c.max_value)) + 1) + 1


def _with_mistake(p: CodeProblem, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("operand", "operand", "function", "syntax"))
    args = [str(a) for a in p.args]
    if kind == "operand":
        k = rng.randrange(len(args))
        digits = list(args[k])
        pos = rng.randrange(len(digits))
        digits[pos] = rng.choice([d for d in "0123456789" if d != digits[pos] and not (pos == 0 and d == "0"
                                                                                       and len(digits) > 1)])
        args[k] = "".join(digits)
        return render_program(p.op, args), "operand"
    if kind == "function":
        swap = {"max": "min", "min": "max", "sum": "sub", "sub": "sum", "mul": "sum"}[p.op]
        prog = render_program(swap, args)
        if CodeProblem(swap, p.args).value == p.value:  # e.g. max of equal numbers: not a mistake; break syntax
            return render_program(p.op, args)[:-1], "syntax"
        return prog, "function"
    return render_program(p.op, args)[:-1], "syntax"  # drop the closing parenthesis: SyntaxError
