"""``oapl-profile run RUN_DIR``: where each step's time went, from a run's ``metrics.jsonl``.

Reads the per-phase times the loop logs (``time/<phase>_s`` and ``time/step_s``, see
:mod:`oapl_megatron.profile.timers`), the step's model FLOPs (``flops/train``), token counts and the engines'
cumulative busy time, and derives:

- a per-step table: every phase, "other" (step wall time not inside any phase) and the step's wall time;
- trainer tokens/s (prompt + response tokens through forward/backward + optimizer time) and trainer MFU
  (model FLOPs / that time / (ranks × peak)); engine tokens/s (generated tokens / engine busy time);
- the engines' idle fraction per step and the sync cost per optimizer step (mean sync time / L).

Writes ``breakdown.json`` (rows + summary) and ``breakdown.png`` (stacked bars per step) into ``--out``
(default: the run directory). Pure post-processing: no torch, no distributed imports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from oapl_megatron.profile.timers import PHASES

SYNC_PHASES = ("weight_gather", "weight_broadcast", "engine_load", "sync_other")
TRAIN_PHASES = ("trainer_fwd_bwd", "optimizer")


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics at {path} (expected RUN_DIR/metrics.jsonl written by oapl-train)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    return rows


def step_rows(metrics: list[dict]) -> list[dict]:
    """One row per optimizer step that carries phase times: {step, phases..., other, step_s, ...}."""
    out = []
    prev_busy = prev_wall = None
    for m in metrics:
        if "time/step_s" not in m:
            continue
        row = {"step": m["step"], "step_s": m["time/step_s"]}
        for p in PHASES:
            row[p] = m.get(f"time/{p}_s") or 0.0
        row["other"] = row["step_s"] - sum(row[p] for p in PHASES)
        row["train_tokens"] = m.get("train_tokens") or 0.0
        row["response_tokens"] = m.get("response_tokens") or 0.0
        row["flops"] = (m.get("flops/train") or 0.0) + (m.get("flops/ref") or 0.0)
        row["world_size"] = m.get("world_size") or 1
        row["lag"] = m.get("lag") or 1
        row["synced"] = any(row[p] > 0 for p in SYNC_PHASES)
        busy, wall = m.get("engine_busy_s"), m.get("engine_wall_s")
        if busy is not None and prev_busy is not None and wall - prev_wall > 0:
            # busy includes evaluation generation; the evaluation phase is the engines' too, not rollout
            gen_busy = max(0.0, (busy - prev_busy) - row["evaluation"] * (m.get("engines") or 1))
            row["engine_busy_s"] = gen_busy
            row["engine_idle_fraction"] = max(0.0, 1.0 - (busy - prev_busy) / ((wall - prev_wall)
                                                                       * (m.get("engines") or 1)))
        prev_busy, prev_wall = busy, wall
        out.append(row)
    return out


def summarize(rows: list[dict], peak_flops_per_rank: float | None, skip_first: int = 1) -> dict:
    """Means over the steps (after ``skip_first`` warm-up steps), throughputs, MFU and sync cost per step."""
    if not rows:
        raise ValueError("no step carries phase times (time/step_s): was the run made before the loop logged them?")
    body = rows[skip_first:] if len(rows) > skip_first else rows
    n = len(body)
    mean = {k: sum(r[k] for r in body) / n for k in (*PHASES, "other", "step_s")}
    train_s = sum(r[p] for r in body for p in TRAIN_PHASES)
    tokens = sum(r["train_tokens"] for r in body)
    flops = sum(r["flops"] for r in body)
    world = body[-1]["world_size"]
    lag = body[-1]["lag"]
    syncs = [sum(r[p] for p in SYNC_PHASES) for r in body if r["synced"]]
    sync_mean = sum(syncs) / len(syncs) if syncs else float("nan")
    gen_rows = [r for r in body if "engine_busy_s" in r]
    gen_busy = sum(r["engine_busy_s"] for r in gen_rows)
    gen_tokens = sum(r["response_tokens"] for r in gen_rows)
    out = {
        "steps": n, "first_step": body[0]["step"], "last_step": body[-1]["step"], "world_size": world, "lag": lag,
        "mean_s": mean,
        "phase_fraction": {k: mean[k] / mean["step_s"] for k in (*PHASES, "other")} if mean["step_s"] else {},
        "accounted_fraction": 1.0 - mean["other"] / mean["step_s"] if mean["step_s"] else float("nan"),
        "trainer_tokens_per_s": tokens / train_s if train_s else float("nan"),
        "trainer_tokens_per_s_per_rank": tokens / train_s / world if train_s else float("nan"),
        "trainer_flops_per_s": flops / train_s if train_s else float("nan"),
        "engine_tokens_per_s": gen_tokens / gen_busy if gen_busy else float("nan"),
        "engine_idle_fraction": (sum(r["engine_idle_fraction"] for r in gen_rows) / len(gen_rows)
                                 if gen_rows else float("nan")),
        "sync_s": sync_mean,
        "sync_s_per_optimizer_step": sync_mean / lag,
        "wait_for_data_fraction": mean["wait_for_data"] / mean["step_s"] if mean["step_s"] else float("nan"),
        "peak_flops_per_rank": peak_flops_per_rank,
    }
    out["trainer_mfu"] = (out["trainer_flops_per_s"] / (world * peak_flops_per_rank)
                          if peak_flops_per_rank else None)
    return out


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(rows: list[dict], summary: dict) -> str:
    cols = [p for p in PHASES if any(r[p] for r in rows)] + ["other", "step_s"]
    head = ["step", *cols]
    lines = [" ".join(f"{h[:16]:>16}" for h in head)]
    for r in rows:
        lines.append(" ".join(f"{x:>16}" for x in [str(r["step"]), *(_fmt(r[c]) for c in cols)]))
    lines.append(" ".join(f"{x:>16}" for x in ["mean", *(_fmt(summary["mean_s"][c]) for c in cols)]))
    s = summary
    lines += [
        "",
        f"steps {s['first_step']}..{s['last_step']} (first step skipped as warm-up), world size {s['world_size']}, "
        f"L = {s['lag']}; phases account for {100 * s['accounted_fraction']:.1f} % of the step time",
        f"trainer: {s['trainer_tokens_per_s']:.1f} tokens/s ({s['trainer_tokens_per_s_per_rank']:.1f} per rank), "
        f"{s['trainer_flops_per_s'] / 1e9:.3f} GFLOP/s model FLOPs"
        + (f", MFU {100 * s['trainer_mfu']:.1f} % of {s['peak_flops_per_rank'] / 1e9:.1f} GFLOP/s per rank"
           if s["trainer_mfu"] is not None else ", MFU: no peak given (--peak-tflops or --peak-json)"),
        f"engines: {_fmt(s['engine_tokens_per_s'])} generated tokens/s while busy, idle fraction "
        f"{_fmt(s['engine_idle_fraction'])}",
        f"weight sync: {_fmt(s['sync_s'])} s per sync → {_fmt(s['sync_s_per_optimizer_step'])} s per optimizer step "
        f"(sync / L); trainer waited for data {100 * s['wait_for_data_fraction']:.1f} % of the step time",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [p for p in PHASES if any(r[p] for r in rows)] + ["other"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(rows) + 3), 4))
    bottom = [0.0] * len(rows)
    x = [r["step"] for r in rows]
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(cols):
        h = [max(0.0, r[c]) for r in rows]
        ax.bar(x, h, bottom=bottom, label=c, color=cmap(i % 20), width=0.8)
        bottom = [b + v for b, v in zip(bottom, h)]
    if len(x) <= 40:
        ax.set_xticks(x)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("seconds")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(v):
    """JSON has no NaN: a quantity that could not be measured (no sync in the window, no peak) is null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def analyze_run(run_dir: Path, peak_flops_per_rank: float | None = None, out: Path | None = None,
                png: bool = True) -> dict:
    """The whole ``oapl-profile run``: returns {"rows", "summary", "table"} and writes JSON (+ PNG)."""
    run_dir = Path(run_dir)
    rows = step_rows(read_metrics(run_dir))
    summary = summarize(rows, peak_flops_per_rank)
    table = format_table(rows, summary)
    out = Path(out) if out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "breakdown.json").write_text(json.dumps(_finite({"run_dir": str(run_dir), "rows": rows,
                                                           "summary": summary}), indent=1))
    if png:
        plot(rows, out / "breakdown.png", f"per-step time breakdown: {run_dir.name}")
    return {"rows": rows, "summary": summary, "table": table}
