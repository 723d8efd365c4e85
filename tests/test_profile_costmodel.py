"""The cost model (oapl_megatron.profile.costmodel): the pipeline formula against a step-by-step simulation of the
loop's schedule, and calibration — after fitting to a measured point the model reproduces that point."""

from __future__ import annotations

import dataclasses
import random

import pytest

from oapl_megatron.profile import costmodel as cm
from oapl_megatron.profile.presets import GPUS, MODELS


def simulate(train_s: float, gen_s: float, sync_s: float, lag: int, versions: int = 3) -> float:
    """Event-by-event schedule of loop.buffer=clear: after a sync the engine generates L chunks back to back
    (gen_s each); trainer step k starts when chunk k is done and step k−1 is done; the next sync starts when both
    the last step and the last chunk are done. Returns the mean time per version."""
    t = 0.0
    for _ in range(versions):
        t += sync_s
        chunk_done = [t + (k + 1) * gen_s for k in range(lag)]
        step_end = t
        for k in range(lag):
            step_end = max(step_end, chunk_done[k]) + train_s
        t = max(step_end, chunk_done[-1])
    return t / versions


def test_pipeline_matches_simulation():
    rng = random.Random(0)
    for _ in range(200):
        tr, ge, sy = rng.uniform(0.01, 5), rng.uniform(0.01, 5), rng.uniform(0, 3)
        lag = rng.randint(1, 60)
        p = cm.pipeline(cm.Components(tr, ge, sy), lag)
        assert p.period_s == pytest.approx(simulate(tr, ge, sy, lag), rel=1e-9)
        assert p.step_s == pytest.approx(p.period_s / lag)
        assert p.engine_idle_fraction == pytest.approx(1 - lag * ge / p.period_s)


def test_lag_amortises_sync_and_saturates_engines():
    c = cm.Components(train_s=1.0, gen_s=1.5, sync_s=10.0)
    idle = [cm.pipeline(c, lag).engine_idle_fraction for lag in (1, 4, 16, 64, 256)]
    assert idle == sorted(idle, reverse=True)  # more lag, less idle
    lag = cm.lag_to_saturate(c, 0.1)
    assert cm.pipeline(c, lag).engine_idle_fraction <= 0.1 < cm.pipeline(c, lag - 1).engine_idle_fraction
    # engines faster than the trainer: idle ≥ 1 − gen/train for any lag → never saturated
    assert cm.lag_to_saturate(cm.Components(2.0, 1.0, 0.5), 0.1) is None


def test_shared_cores_bound():
    # one core shared by a 1-core trainer and a 1-core engine: nothing overlaps, the period is the sum
    c = cm.Components(1.0, 1.0, 0.5, cores=1.0, train_cores=1.0, gen_cores=1.0)
    p = cm.pipeline(c, 4)
    assert p.bound == "cores" and p.period_s == pytest.approx(0.5 + 4 * 2.0)


W = cm.Workload(MODELS["qwen3-4b"], prompts_per_step=32, samples_per_prompt=8, prompt_len=512, response_len=8192)
CL = cm.Cluster(GPUS["h100"], trainer_gpus=8, engine_gpus=8)


def test_calibration_reproduces_its_points():
    measured_train, measured_gen, measured_sync = 40.0, 300.0, 0.9
    eff = cm.calibrate_mfu(W, CL, measured_train)
    assert cm.trainer_step_s(W, CL, eff)["train_s"] == pytest.approx(measured_train, rel=1e-9)
    samples = 50 * 32 * 8
    eff = cm.calibrate_generation(W, CL, samples, measured_gen, eff)
    assert cm.generation_s(W, CL, eff, samples)["gen_s"] == pytest.approx(measured_gen, rel=1e-9)
    eff = cm.calibrate_sync(W, CL, measured_sync, eff)
    assert cm.sync_s(W, CL, eff)["sync_s"] == pytest.approx(measured_sync, rel=1e-9)
    # all three together: the components of the calibrated model are the measured ones
    comps, _ = cm.gpu_components(W, CL, 50, eff)
    assert (comps.train_s, comps.gen_s * 50, comps.sync_s) == pytest.approx((measured_train, measured_gen,
                                                                            measured_sync), rel=1e-9)


def test_measured_components_reproduce_measured_rates():
    rates = cm.MeasuredRates(train_tokens_per_s={1: 1000.0, 2: 1800.0}, gen_tokens_per_s=500.0, sync_s=0.2,
                             cores=2.0)
    c = cm.measured_components(rates, 2, train_tokens_per_step=3600.0, gen_tokens_per_step=1000.0)
    assert (c.train_s, c.gen_s, c.sync_s) == pytest.approx((2.0, 2.0, 0.2))
    with pytest.raises(ValueError, match="world size 4"):
        cm.measured_components(rates, 4, 1.0, 1.0)


def test_gpu_model_sanity():
    r = cm.predict(W, CL, 50)
    # decode of a 4B model at 8K context is memory-bound; a step needs the model's FLOPs at ≤ the assumed MFU
    assert r["detail"]["generation"]["decode_bound"] == "memory"
    assert r["detail"]["trainer"]["achieved_mfu"] <= cm.Efficiency().mfu_max
    # a faster network cannot make the sync slower; more engines cannot make generation slower
    fast = dataclasses.replace(GPUS["h100"], net_bytes_per_s=4 * GPUS["h100"].net_bytes_per_s)
    assert cm.sync_s(W, dataclasses.replace(CL, gpu=fast), cm.Efficiency())["sync_s"] <= r["sync_s"]
    more = cm.predict(W, dataclasses.replace(CL, engine_gpus=16), 50)
    assert more["gen_s_per_step"] <= r["gen_s_per_step"]
    # a trainer state that cannot fit is refused, naming the layout
    with pytest.raises(ValueError, match="does not fit"):
        cm.trainer_step_s(dataclasses.replace(W, arch=MODELS["qwen3-32b"]), dataclasses.replace(CL, trainer_gpus=1),
                          cm.Efficiency())
