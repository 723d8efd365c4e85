"""Run-directory logging on trainer rank 0: ``metrics.jsonl`` (one JSON object per step), TensorBoard, console.

    with MetricsLogger(run_dir, total_steps, cfg.logging) as log:
        log.step(step, {"loss": ..., "reward_mean": ...})
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from oapl_megatron.config.loop import LoggingConfig

# Shown in the progress line, in this order, when present.
_CONSOLE_KEYS = ("loss", "reward_mean", "policy_version", "lag_steps_mean", "lag_steps_max", "kl_k1", "entropy",
                 "grad_norm", "eval_accuracy", "engine_idle_fraction")


# Metrics that depend on wall-clock time or on thread scheduling, not on the training trajectory: a resumed or
# re-run training is compared with the uninterrupted one on everything else (tests, the Slurm preemption check).
TIMING_KEYS = frozenset({
    "time_s", "train_step_s", "train_tokens_per_s", "wait_for_data_s", "engine_idle_fraction", "sync_s",
    "sync_pack_s", "sync_broadcast_s", "sync_verify_s", "sync_load_s", "eval_seconds", "checkpoint_s",
    "buffer_groups", "dropped_stale_groups", "sync_dropped_groups", "trainer_mfu", "engine_busy_s", "engine_wall_s",
    "reward_groups_pending", "reward_programs_per_s", "reward_score_s_per_response",
})
TIMING_PREFIXES = ("time/",)  # the profiler's per-phase times


def trajectory(row: dict) -> dict:
    """``row`` without its timing and scheduling metrics (see :data:`TIMING_KEYS`)."""
    return {k: v for k, v in row.items() if k not in TIMING_KEYS and not k.startswith(TIMING_PREFIXES)}


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; null says "not finite"
    return v


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, cfg: LoggingConfig, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.total = total_steps
        path = self.run_dir / "metrics.jsonl"
        if start_step > 0 and path.exists():
            # resume: rows after the checkpoint's step came from the interrupted run and are replayed now
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        self._jsonl = open(path, "a", buffering=1)
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        self._progress = None
        self._task = None
        if cfg.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]OAPL"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      TextColumn("{task.fields[info]}"), transient=False)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
        self._t0 = time.time()

    def __enter__(self) -> "MetricsLogger":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def step(self, step: int, metrics: dict) -> None:
        record = {"step": step, "time_s": round(time.time() - self._t0, 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        info = "  ".join(f"{k}={metrics[k]:.4g}" for k in _CONSOLE_KEYS if isinstance(metrics.get(k), (int, float)))
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info[:120])
        if step % self.cfg.log_every == 0 or "eval_accuracy" in metrics:
            self.print(f"step {step}/{self.total}  {info}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if not self._jsonl.closed:
            self._jsonl.close()
