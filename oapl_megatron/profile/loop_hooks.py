"""What the training loop (oapl_megatron/orchestrator/loop.py) calls to log the per-step breakdown, FLOPs and traces.

One :class:`LoopProfiler` per rank. Step boundaries are continuous: ``end_step`` closes step k and opens step k+1,
so work done between two steps (logging step k's line) is booked to step k+1's ``logging`` phase and the step
times add up to the loop's wall time::

    prof = LoopProfiler(cfg, rank, world_size, arch)
    for step in ...:
        prof.begin_step(step)                    # starts the trace at profile.steps[0]
        with prof.phase("trainer_fwd_bwd"): ...
        metrics.update(prof.end_step(step, engines))
        with prof.phase("logging"): log.step(step, metrics)
        prof.after_step(step)                     # writes the trace at profile.steps[1]
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from oapl_megatron.profile.flops import train_flops
from oapl_megatron.profile.timers import PhaseTimer, StepTracer


class LoopProfiler:
    def __init__(self, cfg, rank: int, world_size: int, arch):
        self.cfg, self.rank, self.world_size, self.arch = cfg, rank, world_size, arch
        self.timer = PhaseTimer(nvtx=cfg.profile.nvtx)
        self.tracer = StepTracer(cfg.profile.steps, Path(cfg.run_dir) / "traces", rank, cfg.profile.record_shapes)
        self._started = False
        self._batch: dict = {}
        self._gather_s = 0.0

    def begin_step(self, step: int) -> None:
        if not self._started:  # later steps start where the previous one ended
            self.timer.begin_step()
            self._started = True
        with self.timer.phase("tracing"):  # starting torch.profiler at profile.steps[0] takes tens of ms
            self.tracer.before_step(step)

    def phase(self, name: str):
        return self.timer.phase(name)

    def batch_stats(self, records, ref_forward: bool) -> None:
        """Tokens and model FLOPs of this step's batch (all DP ranks together: the records are the global batch)."""
        lens = [len(r.prompt_ids) + len(r.response_ids) for r in records]
        self._batch = {"train_tokens": sum(lens), "flops/train": float(train_flops(self.arch, lens))}
        if ref_forward:  # the frozen copy's forward pass: 1/3 of a training pass
            self._batch["flops/ref"] = self._batch["flops/train"] / 3

    def timed_stream(self, named: Iterable, phase: str = "weight_gather") -> Iterator:
        """Wrap the weight stream: the time spent producing each tensor (the gather collectives) goes to ``phase``
        and is later moved out of the enclosing sync phase by :meth:`book_sync`."""
        self._gather_s = 0.0
        it = iter(named)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self._gather_s += time.perf_counter() - t0
                return
            self._gather_s += time.perf_counter() - t0
            yield item

    def book_sync(self, report) -> None:
        """Split the ``sync_other`` phase into gather / broadcast / engine load with the sync's own timings.

        The gather is streamed into the broadcast (each tensor is pulled from the gather as the packer needs it),
        so the report's broadcast window contains the gather: the broadcast's own share is the window minus the
        time spent producing tensors."""
        gather = self._gather_s
        self.timer.move("sync_other", "weight_gather", gather)
        if report is not None:
            self.timer.move("sync_other", "weight_broadcast", max(0.0, report.broadcast_s - gather))
            self.timer.move("sync_other", "engine_load", report.load_s)

    def end_step(self, step: int, engines=None) -> dict:
        out = self.timer.end_step()
        self.timer.begin_step()
        out.update(self._batch)
        out["world_size"] = self.world_size
        out["lag"] = self.cfg.loop.lag
        train_s = out.get("time/trainer_fwd_bwd_s", 0.0) + out.get("time/optimizer_s", 0.0)
        peak = self.cfg.profile.peak_tflops
        if peak and train_s > 0:
            out["trainer_mfu"] = self._batch.get("flops/train", 0.0) / train_s / (self.world_size * peak * 1e12)
        if engines is not None:
            util = engines.utilization()
            out["engines"] = len(util)
            out["engine_busy_s"] = sum(u["busy_s"] for u in util.values())
            out["engine_wall_s"] = max((u["wall_s"] for u in util.values()), default=0.0)
        self._batch = {}
        return out

    def after_step(self, step: int) -> None:
        with self.timer.phase("tracing"):  # booked to the next step, like logging
            self.tracer.after_step(step)

    def close(self) -> None:
        self.tracer.close()
