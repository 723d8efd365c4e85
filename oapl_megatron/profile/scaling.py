"""``oapl-profile scaling``: weak and strong scaling of the trainer (and of the whole loop) over 1, 2, 4, ... ranks.

Trainer (``trainer_scaling``): for each world size N the sweep worker (:mod:`oapl_megatron.profile.sweep`) runs a
DP-only layout (TP1·PP1, so N replicas; ``--layout`` picks another family) on

- strong scaling: the same global batch at every N — efficiency(N) = T(1) / (N · T(N));
- weak scaling: N times the per-rank batch — efficiency(N) = T(1) / T(N).

Whole loop (``loop_scaling``): ``oapl-train CONFIG`` under torchrun at each N with the given overrides, then the
per-phase breakdown of each run (:mod:`oapl_megatron.profile.breakdown`); step time, trainer and engine tokens/s
and the engine idle fraction per N (strong scaling: the run's P·G per step is fixed).

Writes ``scaling.json`` and ``scaling.png`` in ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from oapl_megatron.profile.launch import WorkerError, run_workers


def _layout_for(family: str, world: int) -> str:
    """``dp`` → tp1pp1; ``tp`` → tpN pp1; ``pp`` → tp1 ppN (1 rank: tp1pp1 always)."""
    if world == 1 or family == "dp":
        return "tp1pp1mbs{m}"
    return {"tp": f"tp{world}pp1mbs{{m}}", "pp": f"tp1pp{world}mbs{{m}}"}[family]


def trainer_scaling(model: str, worlds: list[int], out: Path, seqs_per_rank: int, prompt_len: int,
                    response_len: int, mbs: int, steps: int, warmup: int, family: str = "dp",
                    peak_flops: float | None = None, timeout_s: float = 900, response_jitter: int = 0,
                    kinds: tuple[str, ...] = ("strong", "weak"), strong_seqs: int | None = None) -> dict:
    """``strong_seqs``: the fixed global batch of strong scaling (default seqs_per_rank × the largest world)."""
    rows = []
    for kind in kinds:
        for n in worlds:
            seqs = seqs_per_rank * n if kind == "weak" else (strong_seqs or seqs_per_rank * max(worlds))
            layout = _layout_for(family, n).format(m=mbs)
            args = ["--model", model, "--layouts", layout, "--seqs", str(seqs), "--prompt-len", str(prompt_len),
                    "--response-len", str(response_len), "--steps", str(steps), "--warmup", str(warmup),
                    "--response-jitter", str(response_jitter)]
            if peak_flops:
                args += ["--peak-flops", str(peak_flops)]
            r = run_workers("oapl_megatron.profile.sweep", n, Path(out) / f"{kind}_n{n}", args, timeout_s)
            if not r["rows"]:
                raise WorkerError(f"{kind} scaling at {n} ranks: layout {layout} failed: {r['errors']}")
            row = r["rows"][0]
            rows.append({"kind": kind, "ranks": n, "layout": layout, "seqs": seqs, "step_s": row["step_s"],
                         "fwd_bwd_s": row["fwd_bwd_s"], "optimizer_s": row["optimizer_s"],
                         "tokens_per_s": row["tokens_per_s"], "mfu": row["mfu"],
                         "peak_mem_mb": max(row["peak_mem_bytes_per_rank"]) / 2**20})
    for kind in kinds:
        sub = [r for r in rows if r["kind"] == kind]
        base = next(r for r in sub if r["ranks"] == min(worlds))
        for r in sub:
            k = r["ranks"] / base["ranks"]
            r["efficiency"] = base["step_s"] / (k * r["step_s"]) if kind == "strong" else base["step_s"] / r["step_s"]
    return {"model": model, "family": family, "seqs_per_rank": seqs_per_rank, "prompt_len": prompt_len,
            "response_len": response_len, "mbs": mbs, "steps": steps, "rows": rows}


def loop_scaling(config: str, worlds: list[int], out: Path, overrides: list[str], peak_flops: float | None,
                 timeout_s: float = 1800) -> dict:
    """Run the whole loop at each world size and break each run down."""
    from oapl_megatron.profile.breakdown import analyze_run

    rows = []
    for n in worlds:
        run_dir = Path(out) / f"loop_n{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m",
               "oapl_megatron.entrypoints.train", config, f"run_dir={run_dir}", "logging.progress=false",
               "export.final_hf=false", *overrides]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        wall = time.perf_counter() - t0
        (Path(out) / f"loop_n{n}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        if proc.returncode != 0:
            raise WorkerError(f"oapl-train at {n} ranks exited {proc.returncode}; log: {out}/loop_n{n}.log\n"
                              f"{proc.stderr[-2000:]}")
        res = analyze_run(run_dir, peak_flops)
        s = res["summary"]
        body = res["rows"][1:] or res["rows"]
        m = s["mean_s"]
        rows.append({"ranks": n, "wall_s": wall, "step_s": m["step_s"], "lag": s["lag"],
                     "train_tokens_per_step": sum(r["train_tokens"] for r in body) / len(body),
                     "response_tokens_per_step": sum(r["response_tokens"] for r in body) / len(body),
                     # per-step work on the trainer's serial path that is neither training nor waiting nor sync
                     "overhead_s": m["batch_build"] + m["batch_broadcast"] + m["ref_logp"] + m["bookkeeping"]
                                   + m["logging"] + m["other"],
                     "wait_for_data_s": m["wait_for_data"],
                     "train_s": s["mean_s"]["trainer_fwd_bwd"] + s["mean_s"]["optimizer"],
                     "trainer_tokens_per_s": s["trainer_tokens_per_s"],
                     "engine_tokens_per_s": s["engine_tokens_per_s"],
                     "engine_idle_fraction": s["engine_idle_fraction"], "sync_s": s["sync_s"],
                     "wait_for_data_fraction": s["wait_for_data_fraction"], "run_dir": str(run_dir)})
    base = rows[0]
    for r in rows:
        r["efficiency"] = base["step_s"] * base["ranks"] / (r["step_s"] * r["ranks"])
        r["speedup"] = base["step_s"] / r["step_s"]
    return {"config": config, "overrides": overrides, "rows": rows}


def format_scaling(res: dict) -> str:
    lines = []
    if "trainer" in res:
        t = res["trainer"]
        strong = sorted({r["seqs"] for r in t["rows"] if r["kind"] == "strong"})
        lines.append(f"trainer scaling: model {t['model']}, layout family {t['family']}, {t['seqs_per_rank']} seqs per "
                     f"rank (weak) / {strong} seqs (strong), {t['prompt_len']}+{t['response_len']} tokens")
        lines.append(f"{'kind':>6} {'ranks':>5} {'seqs':>5} {'step s':>8} {'tokens/s':>9} {'efficiency':>10} "
                     f"{'peak MB':>8}")
        for r in t["rows"]:
            lines.append(f"{r['kind']:>6} {r['ranks']:>5} {r['seqs']:>5} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.1f} "
                         f"{100 * r['efficiency']:>9.1f}% {r['peak_mem_mb']:>8.0f}")
    if "loop" in res:
        lp = res["loop"]
        lines.append(f"whole loop: {lp['config']} {' '.join(lp['overrides'])}")
        lines.append(f"{'ranks':>5} {'step s':>8} {'train s':>8} {'sync s':>7} {'trainer tok/s':>13} "
                     f"{'engine tok/s':>12} {'eng idle':>8} {'wait %':>7} {'efficiency':>10}")
        for r in lp["rows"]:
            lines.append(f"{r['ranks']:>5} {r['step_s']:>8.3f} {r['train_s']:>8.3f} {r['sync_s']:>7.3f} "
                         f"{r['trainer_tokens_per_s']:>13.1f} {r['engine_tokens_per_s']:>12.1f} "
                         f"{r['engine_idle_fraction']:>8.2f} {100 * r['wait_for_data_fraction']:>6.1f}% "
                         f"{100 * r['efficiency']:>9.1f}%")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("trainer", "loop") if k in res]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "trainer":
            for kind, style in (("strong", "o-"), ("weak", "s--")):
                sub = [r for r in res["trainer"]["rows"] if r["kind"] == kind]
                ax.plot([r["ranks"] for r in sub], [100 * r["efficiency"] for r in sub], style, label=f"{kind} scaling")
            ax.set_title(f"trainer ({res['trainer']['model']})")
        else:
            sub = res["loop"]["rows"]
            ax.plot([r["ranks"] for r in sub], [100 * r["efficiency"] for r in sub], "o-", label="strong (loop)")
            ax.set_title("whole loop (trainer ranks; 1 engine)")
        ax.axhline(100, color="grey", lw=0.5)
        ax.set_xlabel("trainer ranks")
        ax.set_ylabel("scaling efficiency %")
        top = max(100 * r["efficiency"] for r in res[key]["rows"])
        ax.set_ylim(0, max(120.0, top * 1.1))
        ax.set_xticks(sorted({r["ranks"] for r in res[key]["rows"]}))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "scaling.png")
