"""The loop's side of fault tolerance: fault counters for the metrics, the consecutive-skip stop, checkpoint saves
that may fail, and resume candidates that skip a broken newest checkpoint.

What is handled where:

* engine crashes and hangs — inside the engine group (:mod:`oapl_megatron.rollout.engine_group`); the loop only logs
  its counters and, when no engine is left for ``rollout.no_engine_timeout_s``, stops after a checkpoint at the last
  sync point (:class:`EnginesLost`);
* a non-finite loss or gradient — the train step skips the update on every rank; :class:`FaultState` counts the
  consecutive skips and stops the run after ``loop.max_consecutive_skips``;
* a reward function that raises — the producer scores that sample 0 and counts it (``reward_errors``);
* a checkpoint save that fails (disk full, read-only, permission) — :func:`save_or_report` reports it and the run
  goes on (``checkpoint.on_save_error=continue``) or stops; the commit protocol of the checkpoint code leaves the
  previous checkpoint intact;
* ``--resume`` — :func:`resume_candidates` lists the complete checkpoints newest first; the loop loads the first
  that passes the checkpoint's own checks and says why it skipped the others.

Metrics (rank 0, every step; TensorBoard gets the same scalars): ``engine_failures``, ``engine_restarts``,
``reissued_groups``, ``restarted_engine_prompts``, ``live_engines``, ``reward_errors``, ``skipped_steps``,
``checkpoint_failures``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_STEP_DIR = re.compile(r"^step_(\d{8,})$")  # the checkpoint code's directory naming (trainer/checkpoint.py)
_MARKER = "COMPLETE"


class EnginesLost(RuntimeError):
    """No inference engine was live for longer than ``rollout.no_engine_timeout_s``: the run cannot go on."""


class TooManySkips(RuntimeError):
    """``loop.max_consecutive_skips`` optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class FaultState:
    """Per-rank fault bookkeeping of one run (every rank sees the same skips: the skip decision is all-reduced)."""

    max_consecutive_skips: int = 0  # 0 = never stop
    consecutive_skips: int = 0
    checkpoint_failures: int = 0

    def after_step(self, step: int, metrics: dict, log: Callable[[str], None] | None = None) -> None:
        """Count a skipped step (``metrics["skipped"]``), say so, and raise :class:`TooManySkips` at the limit."""
        metrics["skipped_steps"] = metrics.get("skipped_total", 0.0)
        if not metrics.get("skipped"):
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        message = (f"[oapl-train] step {step}: optimizer step skipped (loss={metrics.get('loss')}, non-finite loss or "
                   f"gradient); {self.consecutive_skips} in a row, {int(metrics['skipped_steps'])} in this run")
        if log is not None:
            log(message)
        if self.max_consecutive_skips and self.consecutive_skips >= self.max_consecutive_skips:
            raise TooManySkips(f"{self.consecutive_skips} consecutive optimizer steps (up to step {step}) had a "
                               f"non-finite loss or gradient (loop.max_consecutive_skips="
                               f"{self.max_consecutive_skips}): the weights are no longer being trained; lower "
                               "optim.lr, check the data and rewards, or resume from an earlier checkpoint")


def fault_metrics(engines, producer) -> dict:
    """The engine group's and the producer's fault counters (rank 0)."""
    out = dict(engines.fault_counters()) if hasattr(engines, "fault_counters") else {}
    out["reward_errors"] = getattr(producer, "reward_errors", 0)
    return out


def save_or_report(save: Callable[[], float], step: int, faults: FaultState, stop_on_error: bool,
                   log: Callable[[str], None] | None, previous: Path | None) -> tuple[float, str | None]:
    """Run the collective ``save``; on failure report it (rank 0's ``log``), count it, and go on unless
    ``stop_on_error``. Returns (seconds, error or None).

    Safe to continue because the checkpoint code raises the same error on every rank (it agrees on failures
    before its commit) and commits by one atomic rename: the previous checkpoint is untouched and the half-written
    temp dir is ignored (and removed at the next save or resume)."""
    import time

    from oapl_megatron.trainer.checkpoint import CheckpointError

    t0 = time.perf_counter()
    try:
        save()
    except (CheckpointError, OSError) as e:
        faults.checkpoint_failures += 1
        error = f"{type(e).__name__}: {e}"
        if log is not None:
            log(f"[oapl-train] checkpoint at step {step} FAILED ({error}); the previous checkpoint "
                f"{previous if previous is not None else '(none)'} is intact; "
                f"{'stopping (checkpoint.on_save_error=stop)' if stop_on_error else 'training goes on'}")
        if stop_on_error:
            raise
        return time.perf_counter() - t0, error
    return time.perf_counter() - t0, None


def resume_candidates(root: Path) -> list[Path]:
    """Checkpoint dirs under ``root`` that carry a ``COMPLETE`` marker naming their step, newest first (the
    checkpoint's own loader then checks every file's size and CRC-32)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def marker_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint by its marker alone (missing, unreadable, wrong step), or None."""
    marker = Path(path) / _MARKER
    try:
        manifest = json.loads(marker.read_text())
    except FileNotFoundError:
        return f"{marker} is missing (the save did not complete)"
    except (OSError, ValueError) as e:
        return f"{marker} is unreadable ({e})"
    m = _STEP_DIR.match(Path(path).name)
    if not isinstance(manifest, dict) or m is None or manifest.get("step") != int(m.group(1)):
        return f"{marker} does not name step {int(m.group(1)) if m else '?'}"
    return None
