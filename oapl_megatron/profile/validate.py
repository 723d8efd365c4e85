"""``oapl-profile validate``: the cost model's predicted loop step time vs the measured one on this machine.

Calibration points (all measured, none taken from the run being predicted except where stated):

- trainer tokens/s at each world size: the *trainer-only* strong-scaling table of ``oapl-profile scaling`` (a
  separate measurement, with the loop's batch shape);
- one engine's generated tokens/s while busy, one weight sync's time and the per-step overhead (batch broadcast,
  logging, unaccounted time): the loop run at ``--calibrate-on`` ranks (default 1).

For every loop run the model (:func:`oapl_megatron.profile.costmodel.pipeline`, shared-cores variant: trainer
ranks and the engine share ``cores`` processors) predicts the step time and the engines' idle fraction; the table
shows both next to the measurement and the relative error.

A second prediction ("own components") feeds the schedule model each run's *own* measured trainer time, engine
rate and sync time: it tests the composition (how generation, training and sync overlap and where the trainer
waits) separately from the component rates. Those rates were measured inside the run, contention included, so
no shared-cores bound is applied to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from oapl_megatron.profile import costmodel as cm


def validate(trainer_json: list[Path], loop_json: list[Path], cores: float | None = None,
             calibrate_on: int = 1) -> dict:
    """Several files are merged (e.g. one trainer and one loop measurement per world size, taken back to back)."""
    strong = {r["ranks"]: r["tokens_per_s"] for p in trainer_json
              for r in json.loads(Path(p).read_text())["trainer"]["rows"] if r["kind"] == "strong"}
    loop = {"rows": sorted((r for p in loop_json for r in json.loads(Path(p).read_text())["loop"]["rows"]),
                           key=lambda r: r["ranks"])}
    fixed = next((r for r in loop["rows"] if r["ranks"] == calibrate_on), None)
    if calibrate_on and fixed is None:
        raise ValueError(f"--calibrate-on {calibrate_on}: no loop run at that world size in {loop_json}")
    cores = cores or float(os.cpu_count() or 1)
    rows = []
    for r in loop["rows"]:
        calib = fixed or r  # calibrate_on=0: each run's own engine rate, sync and overhead; only the trainer predicted
        rates = cm.MeasuredRates(train_tokens_per_s=strong, gen_tokens_per_s=calib["engine_tokens_per_s"],
                                 sync_s=calib["sync_s"], cores=cores)
        c = cm.measured_components(rates, r["ranks"], r["train_tokens_per_step"], r["response_tokens_per_step"])
        # the per-step overhead sits on the trainer's serial path
        c = cm.Components(c.train_s + calib["overhead_s"], c.gen_s, c.sync_s, c.cores, c.train_cores, c.gen_cores)
        p = cm.pipeline(c, int(r["lag"]))
        own = cm.pipeline(cm.Components(r["train_s"] + r["overhead_s"],
                                        r["response_tokens_per_step"] / r["engine_tokens_per_s"], r["sync_s"]),
                          int(r["lag"]))
        rows.append({"ranks": r["ranks"], "measured_step_s": r["step_s"], "predicted_step_s": p.step_s,
                     "error": p.step_s / r["step_s"] - 1.0, "bound": p.bound,
                     "own_predicted_step_s": own.step_s, "own_error": own.step_s / r["step_s"] - 1.0,
                     "own_bound": own.bound, "own_predicted_engine_idle": own.engine_idle_fraction,
                     "measured_engine_idle": r["engine_idle_fraction"], "predicted_engine_idle":
                         p.engine_idle_fraction, "predicted_train_s": c.train_s, "predicted_gen_s": c.gen_s,
                     "measured_train_s": r["train_s"], "calibration_point": r["ranks"] == calibrate_on,
                     "gen_tokens_per_s": rates.gen_tokens_per_s, "sync_s": rates.sync_s,
                     "overhead_s": calib["overhead_s"]})
    return {"cores": cores, "calibrate_on": calibrate_on, "rates": {"train_tokens_per_s": strong}, "rows": rows}


def format_validation(res: dict) -> str:
    r0 = res["rates"]
    src = f"the loop run at {res['calibrate_on']} rank(s)" if res["calibrate_on"] else "each loop run itself"
    e = res["rows"][0]
    lines = [f"calibration: trainer tokens/s by ranks {({k: round(v, 1) for k, v in r0['train_tokens_per_s'].items()})}"
             f" (trainer-only scaling); engine tokens/s, sync and per-step overhead from {src} (first row: "
             f"{e['gen_tokens_per_s']:.1f} tokens/s, {e['sync_s']:.3f} s, {e['overhead_s']:.3f} s); "
             f"{res['cores']:g} shared cores",
             f"{'ranks':>5} {'measured s':>10} {'predicted s':>11} {'error':>7} {'bound':>8} {'idle meas':>9} "
             f"{'idle pred':>9} {'own-comp s':>10} {'error':>7} {'bound':>8}"]
    for r in res["rows"]:
        lines.append(f"{r['ranks']:>5} {r['measured_step_s']:>10.3f} {r['predicted_step_s']:>11.3f} "
                     f"{100 * r['error']:>6.1f}% {r['bound']:>8} {r['measured_engine_idle']:>9.2f} "
                     f"{r['predicted_engine_idle']:>9.2f} {r['own_predicted_step_s']:>10.3f} "
                     f"{100 * r['own_error']:>6.1f}% {r['own_bound']:>8}")
    return "\n".join(lines)
