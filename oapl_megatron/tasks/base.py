"""The task interface: where prompts come from and how a response is scored.

A task yields :class:`Prompt` records (an endless, seeded training stream and a fixed evaluation list) and scores a
response with :meth:`Task.reward`. Rollout code only needs this interface, so new tasks (math with a verifier, code
with tests) plug in without touching it.

    task = SyntheticArithmeticTask(SyntheticTaskConfig())
    prompt = next(task.train_prompts(seed=0))
    result = task.reward(prompt, decode_completion(tokenizer, output.token_ids))   # RewardResult(reward=1.0, ...)

Convention for ``response_text``: the generated completion only (no prompt), decoded *with special tokens kept*
(:func:`oapl_megatron.tasks.tokenizer.decode_completion`), so a completion that stopped on EOS ends with the
tokenizer's EOS string and one cut at the length limit does not.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Prompt:
    """One problem. ``id`` is stable across runs (same problem → same id); ``answer`` is the reference answer."""

    id: str
    text: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardResult:
    """A scored response: ``reward`` is what the objective sees; ``info`` explains it (logged, never optimized)."""

    reward: float
    info: dict[str, Any] = field(default_factory=dict)


class Task(abc.ABC):
    """A source of prompts with a verifiable reward."""

    @abc.abstractmethod
    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        """An endless, deterministic stream of training prompts for ``seed``; never yields an eval prompt."""

    @abc.abstractmethod
    def eval_prompts(self) -> list[Prompt]:
        """The fixed held-out evaluation prompts (same list on every call and every run with the same config)."""

    @abc.abstractmethod
    def reward(self, prompt: Prompt, response_text: str) -> RewardResult:
        """Score ``response_text`` (see the module docstring for its form) against ``prompt``."""



class GeneratedTask(Task):
    """A task whose problems come from a seeded generator split by hash into train and held-out problems (the
    synthetic tasks). Subclasses set ``config`` (with ``seed``, ``eval_size``, ``eval_fraction``) and implement
    ``_problems(stream, split)`` (an endless, seeded stream of one split), ``_prompt(problem, split)``,
    ``_eval_key(problem)`` (what makes two held-out problems the same) and ``EVAL_HINT`` (which settings to change when
    there are too few distinct ones)."""

    EVAL_HINT = "lower task.eval_size"
    _eval: list[Prompt] | None = None

    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        """Endless training prompts for ``seed`` (mixed with ``config.seed``); repeats are possible, eval never."""
        for p in self._problems(f"train:{self.config.seed}:{seed}", "train"):
            yield self._prompt(p, "train")

    def eval_prompts(self) -> list[Prompt]:
        """``config.eval_size`` distinct held-out prompts, fixed by ``config.seed``."""
        if self._eval is None:
            size = self.config.eval_size
            # ~size/eval_fraction draws are expected; the config validators keep the eval split ≥ 2× eval_size,
            # so 20× that only runs out on a broken config or a degenerate sampling distribution.
            budget = int(20 * size / self.config.eval_fraction) + 10_000
            problems = first_distinct(self._problems(f"eval:{self.config.seed}", "eval"), self._eval_key, size,
                                      budget, self.EVAL_HINT)
            self._eval = [self._prompt(p, "eval") for p in problems]
        return list(self._eval)

    def _noisy_draws(self, name: str, n: int, frac: float, seed: int) -> Iterator[tuple[Any, bool, random.Random]]:
        """The warm start's draws: ``n`` training problems of which exactly ``round(n * frac)``, at random positions,
        are marked to carry a mistake. Yields ``(problem, noisy, rng)``; the rng that chose the positions also makes
        the mistakes, so an example set is a pure function of (name, config.seed, seed, n, frac)."""
        rng = random.Random(f"{name}:sft:{self.config.seed}:{seed}")
        bad = set(rng.sample(range(n), round(n * frac)))
        problems = self._problems(f"sft:{self.config.seed}:{seed}", "train")
        for i in range(n):
            yield next(problems), i in bad, rng


def first_distinct(items: Iterable[T], key: Callable[[T], str], size: int, budget: int, hint: str) -> list[T]:
    """The first ``size`` items with distinct ``key`` (a synthetic task's held-out set), drawing at most ``budget``
    items; fewer distinct ones than that is a config error (``hint`` says which settings to change)."""
    seen: set[str] = set()
    out: list[T] = []
    for tries, item in enumerate(items):
        if tries >= budget:
            raise RuntimeError(f"found only {len(out)} distinct eval problems for task.eval_size={size} after {budget} "
                               f"draws; {hint}")
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
            if len(out) == size:
                break
    return out
