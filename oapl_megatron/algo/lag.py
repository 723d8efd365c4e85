"""Lag arithmetic: when the trainer pushes weights to the inference engines, and how stale a sample may be.

Conventions (OAPL Algorithm 1, STYLE.md principle 11):

* ``step`` counts *completed* optimizer steps: 0 before the first update, k after the k-th.
* The engines start with the trainer's initial weights, policy version 0. After every ``lag`` completed steps the
  trainer syncs (π_vllm ← π), so after step k the engines hold version ``k // lag``.
* A sample carries the version of the weights that generated it. Its staleness is
  ``current_version − sample_version`` (in syncs, not steps); a negative value is a bookkeeping bug.
* OAPL clears the buffer at every sync, so its data has staleness 0 while the trainer's weights are up to
  ``lag − 1`` optimizer steps ahead of π_vllm (:meth:`SyncSchedule.steps_since_sync`).

    sched = SyncSchedule(lag=50)
    for step in range(1, total + 1):
        check_staleness(batch_versions, current=sched.version_at(step - 1), max_staleness=0)
        train_step(...)
        if sched.should_sync(step):
            push_weights(version=sched.version_at(step))
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence


def _check_int(value: object, name: str, minimum: int) -> int:
    """``value`` as an int (numpy integers accepted, bools and floats refused), at least ``minimum``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


class StaleSampleError(ValueError):
    """A sample is older (or newer) than the lag contract allows."""


@dataclass(frozen=True)
class SyncSchedule:
    """Sync after every ``lag`` optimizer steps (lag ≥ 1; lag = 1 is on-policy up to generation overlap)."""

    lag: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "lag", _check_int(self.lag, "lag", 1))

    def should_sync(self, step: int) -> bool:
        """True if weights are pushed right after completed step ``step`` (≥ 0; step 0 is the initial state)."""
        step = _check_int(step, "step", 0)
        return step > 0 and step % self.lag == 0

    def version_at(self, step: int) -> int:
        """Policy version the engines hold after ``step`` completed steps (and the sync that may follow it)."""
        step = _check_int(step, "step", 0)
        return step // self.lag

    def steps_since_sync(self, step: int) -> int:
        """How many optimizer steps the trainer's weights are ahead of π_vllm after ``step`` completed steps."""
        step = _check_int(step, "step", 0)
        return step % self.lag


def staleness(sample_version: int, current_version: int) -> int:
    """``current_version − sample_version``, in syncs. Raises if the sample claims a future version."""
    sample_version = _check_int(sample_version, "sample_version", 0)
    current_version = _check_int(current_version, "current_version", 0)
    if sample_version > current_version:
        raise StaleSampleError(
            f"sample version {sample_version} is newer than the current policy version {current_version}: "
            "versions are out of sync between trainer and engines"
        )
    return current_version - sample_version


def check_staleness(versions: Sequence[int], current: int, max_staleness: int) -> None:
    """Raise :class:`StaleSampleError` naming the first sample whose staleness exceeds ``max_staleness``.

    Args:
        versions: the policy version of each sample about to be consumed (index = position in the batch).
        current: the current policy version of the engines.
        max_staleness: the largest allowed ``current − version`` (0 = only data from the current version, as
            OAPL's Algorithm 1 guarantees by clearing the buffer at each sync).
    """
    max_staleness = _check_int(max_staleness, "max_staleness", 0)
    current = _check_int(current, "current", 0)
    bad = []
    checked = [_check_int(v, f"versions[{i}]", 0) for i, v in enumerate(versions)]
    for i, v in enumerate(checked):
        if v > current:
            raise StaleSampleError(
                f"sample {i} has policy version {v}, newer than the current version {current}: "
                "versions are out of sync between trainer and engines"
            )
        if current - v > max_staleness:
            bad.append(i)
    if bad:
        i = bad[0]
        raise StaleSampleError(
            f"sample {i} has policy version {checked[i]}, staleness {current - checked[i]} > max_staleness "
            f"{max_staleness} (current version {current}; {len(bad)} of {len(versions)} samples too stale)"
        )
