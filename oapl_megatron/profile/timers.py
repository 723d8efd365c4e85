"""Per-phase wall-clock timers of one loop step, with NVTX ranges on GPU; what ``oapl-profile run`` breaks down.

The loop wraps each phase of a step in ``timer.phase(name)``; at the end of the step ``timer.end_step()`` returns
``{"time/<phase>_s": seconds, ..., "time/step_s": wall time of the whole step}``. Phases may repeat within a step
(their times add up) but must not nest: the phases of a step are disjoint, so their sum is the part of the step's
wall time that is accounted for (``oapl-profile run`` reports the rest as "other").

    timer = PhaseTimer(nvtx=True)
    timer.begin_step()
    with timer.phase("trainer_fwd_bwd"):
        ...
    metrics.update(timer.end_step())

On a CUDA device a phase synchronises the device before reading the clock when ``cuda_sync`` is set (otherwise
asynchronous kernels would be billed to whichever phase next waits on them).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

# The phases the loop reports, in the order of a step; oapl-profile run plots them in this order.
PHASES = ("wait_for_data", "batch_build", "batch_broadcast", "ref_logp", "trainer_fwd_bwd", "optimizer",
          "weight_gather", "weight_broadcast", "engine_load", "sync_other", "checkpoint", "evaluation", "bookkeeping",
          "logging", "tracing")


class PhaseTimer:
    def __init__(self, nvtx: bool = False, cuda_sync: bool | None = None):
        cuda = torch.cuda.is_available()
        self.nvtx = nvtx and cuda
        self.cuda_sync = cuda if cuda_sync is None else (cuda_sync and cuda)
        self._times: dict[str, float] = defaultdict(float)
        self._t_step: float | None = None
        self._open: str | None = None

    def begin_step(self) -> None:
        self._times.clear()
        self._t_step = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        if self._open is not None:
            raise RuntimeError(f"PhaseTimer: phase {name!r} started inside phase {self._open!r} (phases are disjoint)")
        self._open = name
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        if self.cuda_sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda_sync:
                torch.cuda.synchronize()
            self._times[name] += time.perf_counter() - t0
            if self.nvtx:
                torch.cuda.nvtx.range_pop()
            self._open = None

    def add(self, name: str, seconds: float) -> None:
        """Book time measured elsewhere (e.g. the engines' load time inside a sync) to a phase."""
        self._times[name] += seconds

    def move(self, src: str, dst: str, seconds: float) -> None:
        """Re-book ``seconds`` of phase ``src`` to ``dst`` (a sub-phase measured inside it); clamped to ``src``."""
        seconds = max(0.0, min(seconds, self._times.get(src, 0.0)))
        self._times[src] -= seconds
        self._times[dst] += seconds

    def end_step(self) -> dict[str, float]:
        if self._t_step is None:
            raise RuntimeError("PhaseTimer.end_step() without begin_step()")
        out = {f"time/{k}_s": v for k, v in self._times.items()}
        out["time/step_s"] = time.perf_counter() - self._t_step
        self._t_step = None
        return out


class StepTracer:
    """``profile.steps=[a, b]``: a torch.profiler trace of optimizer steps a..b on this rank.

    Call ``before_step(step)`` at the top of every step and ``after_step(step)`` at its end; the trace is written
    when step b ends: Chrome trace JSON ``rank{R}.pt.trace.json`` under ``out_dir`` — Perfetto / chrome://tracing open
    it, and TensorBoard's PyTorch profiler plugin (torch-tb-profiler) finds it by its ``.pt.trace.json`` suffix."""

    def __init__(self, steps: list[int] | None, out_dir, rank: int, record_shapes: bool = False):
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.out_dir, self.rank, self.record_shapes = out_dir, rank, record_shapes
        self._prof = None
        self.written: str | None = None

    def before_step(self, step: int) -> None:
        if self.first is None or step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=acts, record_shapes=self.record_shapes, with_stack=False)
        self._prof.__enter__()

    def after_step(self, step: int) -> None:
        if self._prof is None or step != self.last:
            return
        from pathlib import Path

        self._prof.__exit__(None, None, None)
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank{self.rank}.pt.trace.json"
        self._prof.export_chrome_trace(str(path))
        self._prof = None
        self.written = str(path)

    def close(self) -> None:
        """Stop a trace left open by a run that ended before step b (the partial trace is written)."""
        if self._prof is not None:
            self.after_step(self.last)
