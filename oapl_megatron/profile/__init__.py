"""Profiling: FLOP counting, per-phase step timers and traces, run breakdowns, layout sweeps, scaling tables and
the calibrated cost model behind ``oapl-profile`` (see :mod:`oapl_megatron.entrypoints.profiling`)."""
