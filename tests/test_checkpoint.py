"""Training checkpoints resume exactly, reshard over DP, survive a SIGKILL mid-save and reject damaged files.

Real megatron-core (gloo, CPU fp32), real dist_checkpointing, real subprocesses (tests/workers/checkpoint_worker.py):

* exactness — run 4 steps (saving at step 2), then a new process loads step 2 and runs steps 3–4: losses, LR,
  final weights and every rank's Adam state (exp_avg, exp_avg_sq, step) are bitwise equal, at TP1·PP1 (1 process)
  and TP2 (2 ranks). Dropout is on, so the RNG of every rank must be restored too; the LR has warmup + cosine,
  so the scheduler state must be restored.
* DP resharding — save at world 2 (TP1·DP2), load at world 1 (DP1) and world 4 (DP4): the weights right after
  the load are bitwise those saved, the Adam moments have the same totals and step count; the next step's loss
  matches to rel 1e-6 and the weights after it to 1e-6 absolute. Not required bitwise: the loss and gradient sums
  over 2 DP ranks are reduced in a different order than over 1 or 4 ranks (fp32 round-off, ~1e-7 relative; one
  Adam step of lr 2e-3 turns that into far below 1e-6 in the weights). Measured: loss equal, weights ≤ 7.5e-9.
* atomicity — the saver is SIGKILLed in the middle of the save of step 3 (after the model/optimizer files, and
  in another run after the manifest but before the rename): latest_checkpoint returns step 2 and removes the temp
  dir; step 2 loads; the next complete save with keep_last=2 deletes only the oldest complete checkpoint.
* damage — a truncated distcp file, a flipped byte, a missing file and a missing marker each raise
  CheckpointError naming the file, and leave the loaded state untouched.
* one format — a training checkpoint carries the model sidecar and the HF side files; ``oapl-convert
  mcore-to-hf`` reads it as it is (model only) and writes exactly the weights the trainer held at that step;
  ``reshard`` makes a model-only checkpoint of it, which the trainer's resume refuses.
The SIGKILL tests stop the save through ``save_checkpoint(on_phase=...)`` (the worker's ``pause`` spec).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_util import REPO, run_torchrun
from oapl_megatron.config.checkpoint import CheckpointConfig
from oapl_megatron.trainer.checkpoint import MARKER, checkpoint_dir, latest_checkpoint, read_manifest, read_sidecar

WORKER = REPO / "tests" / "workers" / "checkpoint_worker.py"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def _env(out: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ, **ENV, OAPL_TEST_OUT=str(out))
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.update(extra or {})
    return env


def run_single(spec: dict, out: Path, timeout: float = 300) -> None:
    """One plain process (a world of one: init_distributed makes a private store)."""
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(spec)], env=_env(out), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stderr[-6000:]}"


def run(spec: dict, out: Path, nproc: int) -> dict:
    if nproc == 1:
        run_single(spec, out)
    else:
        run_torchrun(WORKER, nproc, out, [json.dumps(spec)], timeout=300)
    return torch.load(out / f"{spec['out']}.pt", weights_only=False)


def _adam_equal(a: list, b: list) -> bool:
    assert len(a) == len(b) and all(len(x) == len(y) > 0 for x, y in zip(a, b))
    return all(set(p) == set(q) == {"step", "exp_avg", "exp_avg_sq"} and all(torch.equal(p[k], q[k]) for k in p)
               for ra, rb in zip(a, b) for p, q in zip(ra, rb))


# ----------------------------------------------------------------------------------------------------------------
# No megatron: the finder and the config
# ----------------------------------------------------------------------------------------------------------------


def test_latest_checkpoint_ignores_incomplete_and_cleans_temp_dirs(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    for step in (3, 7, 9, 12):
        checkpoint_dir(tmp_path, step).mkdir()
    (checkpoint_dir(tmp_path, 3) / MARKER).write_text(json.dumps({"step": 3}))
    (checkpoint_dir(tmp_path, 7) / MARKER).write_text(json.dumps({"step": 7}))
    (checkpoint_dir(tmp_path, 9) / MARKER).write_text(json.dumps({"step": 8}))  # marker of another step
    (checkpoint_dir(tmp_path, 12) / MARKER).write_text("{trunc")  # unreadable marker
    (tmp_path / ".tmp_step_00000013").mkdir()
    (tmp_path / ".tmp_step_00000013" / MARKER).write_text(json.dumps({"step": 13}))
    assert latest_checkpoint(tmp_path, cleanup=False) == checkpoint_dir(tmp_path, 7)
    assert (tmp_path / ".tmp_step_00000013").exists()
    assert latest_checkpoint(tmp_path, cleanup=True) == checkpoint_dir(tmp_path, 7)
    assert not (tmp_path / ".tmp_step_00000013").exists()


def test_host_rng_seed_capture_restore():
    """parallel/rng.py (bootstrap seeds with it, the checkpoint saves/restores/derives with it)."""
    import random

    import numpy as np

    from oapl_megatron.parallel.rng import derived_seed, host_rng_state, seed_host_rngs, set_host_rng_state

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    seed_host_rngs(7)
    first = draws()
    seed_host_rngs(7)
    saved = host_rng_state()
    assert draws() == first
    draws()
    set_host_rng_state(saved)
    assert draws() == first
    # deterministic, distinct per part, in [0, 2**63)
    a = derived_seed("oapl-rng", "step3", "tp0", "pp1", "dp2")
    assert a == derived_seed("oapl-rng", "step3", "tp0", "pp1", "dp2") != derived_seed("oapl-rng", "step3", "dp3")
    assert 0 <= a < 2**63


def test_checkpoint_config_bounds_and_defaults(tmp_path):
    cfg = CheckpointConfig()
    assert cfg.resolve_dir(tmp_path) == tmp_path / "checkpoints" and not cfg.due(5)
    cfg = CheckpointConfig(every_steps=5, dir=str(tmp_path / "c"))
    assert cfg.resolve_dir(Path("elsewhere")) == tmp_path / "c" and cfg.due(10) and not cfg.due(11)
    for bad in ({"keep_last": 0}, {"every_steps": -1}, {"unknown": 1}):
        with pytest.raises(ValueError):
            CheckpointConfig(**bad)


# ----------------------------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("tp,nproc", [(1, 1), (2, 2)], ids=["tp1pp1", "tp2"])
def test_resume_is_bitwise_exact(tmp_path, tp, nproc):
    root = tmp_path / "ckpt"
    base = {"mode": "train", "tp": tp, "steps": 4, "dropout": 0.1, "root": str(root)}
    a = run({**base, "save_at": [2], "record_at": [2], "out": "straight"}, tmp_path, nproc)
    b = run({**base, "resume": "latest", "out": "resumed"}, tmp_path, nproc)
    assert b["loaded_from"] == "step_00000002"
    side = read_sidecar(checkpoint_dir(root, 2))  # convertible as it is: sidecar + HF side files
    assert (side["tp"], side["pp"], side["vpp"], side["layer_spec"], side["dtype"]) == (tp, 1, None, "local",
                                                                                        "float32")
    assert read_manifest(checkpoint_dir(root, 2))["kind"] == "training"
    assert (checkpoint_dir(root, 2) / "hf" / "config.json").is_file()
    assert b["extra"]["step"] == 2 and b["extra"]["losses"] == {k: a["losses"][k] for k in (1, 2)}
    assert b["extra"]["buffer"] == [{"version": 1, "tokens": [0, 1, 2, 3]}]
    assert all(torch.equal(a["recorded"][2][k], b["after_load"][k]) for k in a["recorded"][2])
    assert _adam_equal(a["adam_recorded"][2], b["adam_after_load"])
    assert b["losses"] == {k: a["losses"][k] for k in (3, 4)}  # float equality: bitwise
    assert b["lrs"] == {k: a["lrs"][k] for k in (3, 4)} and a["lrs"][3] != a["lrs"][4]
    assert set(a["final"]) == set(b["final"]) and len(a["final"]) > 10
    assert all(torch.equal(a["final"][k], b["final"][k]) for k in a["final"])
    assert _adam_equal(a["adam"], b["adam"])
    assert float(b["adam"][0][0]["step"]) == 4.0


@pytest.fixture(scope="module")
def saved_at_dp2(tmp_path_factory):
    """3 steps at world 2 (TP1·DP2), saving at step 2."""
    out = tmp_path_factory.mktemp("dp2")
    spec = {"mode": "train", "tp": 1, "steps": 3, "dropout": 0.0, "root": str(out / "ckpt"), "save_at": [2],
            "record_at": [2], "out": "dp2"}
    return out, spec, run(spec, out, 2)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4], ids=["fewer_dp_ranks", "more_dp_ranks"])
def test_resume_with_a_different_dp_size(saved_at_dp2, world):
    """DP1: rank 0 keeps DP rank 0's RNG. DP4: ranks 2 and 3 did not exist (seeded RNG)."""
    out, spec, a = saved_at_dp2
    b = run({**spec, "save_at": [], "record_at": [], "resume": "latest", "out": f"dp{world}"}, out, world)
    assert all(torch.equal(a["recorded"][2][k], b["after_load"][k]) for k in a["recorded"][2])
    # Adam state: DP2 shards vs DP1/DP4 shards of the same buffers; same totals and step counts.
    for key in ("exp_avg", "exp_avg_sq"):
        tot_a = sum(p[key].double().abs().sum().item() for r in a["adam_recorded"][2] for p in r)
        tot_b = sum(p[key].double().abs().sum().item() for r in b["adam_after_load"] for p in r)
        assert tot_a > 0 and tot_b == pytest.approx(tot_a, rel=1e-12), key
    assert len(b["adam_after_load"]) == world
    assert {float(p["step"]) for r in b["adam_after_load"] for p in r} == {2.0}
    assert b["lr_after_load"] == a["lrs"][2]
    assert b["losses"][3] == pytest.approx(a["losses"][3], rel=1e-6)
    worst = max((a["final"][k] - b["final"][k]).abs().max().item() for k in a["final"])
    moved = max((a["final"][k] - a["recorded"][2][k]).abs().max().item() for k in a["final"])
    assert worst <= 1e-6 < moved, (worst, moved)


# ----------------------------------------------------------------------------------------------------------------
# SIGKILL mid-save, keep_last, damaged files
# ----------------------------------------------------------------------------------------------------------------


def _train_and_kill(tmp_path: Path, phase: str) -> Path:
    """Save steps 1 and 2 (keep_last 2), then SIGKILL the process inside the save of step 3 at ``phase``."""
    root = tmp_path / "ckpt"
    signal_file = tmp_path / "paused"
    spec = {"mode": "train", "steps": 3, "root": str(root), "save_at": [1, 2, 3], "keep_last": 2,
            "record_at": [2], "out": "killed"}
    spec["pause"] = {"phase": phase, "step": 3, "signal": str(signal_file)}
    proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=_env(tmp_path), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not signal_file.exists():
            assert proc.poll() is None, f"worker exited early:\n{proc.stderr.read().decode()[-4000:]}"
            assert time.monotonic() < deadline, "the worker never reached the pause point"
            time.sleep(0.2)
        tmp = root / ".tmp_step_00000003"
        assert (tmp / "model_optim" / "metadata.json").is_file()  # part of the save is on disk
        assert (tmp / MARKER).exists() == (phase == "before_commit")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and dist_checkpointing's manager child
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return root


@pytest.mark.slow
def test_sigkill_before_commit_keeps_previous_checkpoint(tmp_path):
    root = _train_and_kill(tmp_path, "before_commit")
    assert sorted(p.name for p in root.iterdir()) == [".tmp_step_00000003", "step_00000001", "step_00000002"]
    assert latest_checkpoint(root) == checkpoint_dir(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]


@pytest.fixture(scope="module")
def after_kill(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    root = _train_and_kill(tmp, "after_model_optim")
    run_single({"mode": "check_after_kill", "root": str(root), "out": "check"}, tmp)
    res = torch.load(tmp / "check.pt", weights_only=False)
    res["recorded"] = torch.load(tmp / "killed.recorded.pt", weights_only=False)
    res["root"] = root
    return res


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_and_keep_last(after_kill):
    r = after_kill
    assert r["dirs_before"] == [".tmp_step_00000003", "step_00000001", "step_00000002"]
    assert r["latest"] == "step_00000002" and r["extra_step"] == 2
    assert r["dirs_after_latest"] == ["step_00000001", "step_00000002"]
    assert all(torch.equal(r["recorded"][2][k], r["loaded"][k]) for k in r["loaded"])
    # step 3 saved completely with keep_last=2: only the oldest complete checkpoint went
    assert r["dirs_after_save"] == ["step_00000002", "step_00000003"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing", "no_marker"])
def test_damaged_checkpoint_names_the_file(after_kill, damage):
    msg = after_kill["errors"][damage]
    assert msg is not None, f"{damage}: load succeeded"
    target = {"truncated": after_kill["targets"]["truncated"], "flipped": after_kill["targets"]["flipped"],
              "missing": "extra.pt", "no_marker": MARKER}[damage]
    assert str(target) in msg, msg
    assert {"truncated": "truncated", "flipped": "corrupted", "missing": "missing",
            "no_marker": "not a complete checkpoint"}[damage] in msg, msg
    assert after_kill["unchanged_after_failed_loads"]


# ----------------------------------------------------------------------------------------------------------------
# One format: oapl-convert reads a training checkpoint as it is
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_checkpoint_converts_to_the_weights_the_trainer_held(after_kill, tmp_path, capsys):
    """mcore-to-hf of step 2 (a training checkpoint with optimizer state) gives bitwise the HF-named weights the
    trainer recorded at step 2; the tokenizer/config side files travel along; a training checkpoint with a
    missing listed file and a model-only checkpoint given to the trainer's resume are refused by name."""
    from safetensors.torch import load_file

    from oapl_megatron.entrypoints.convert import main as convert_main

    step2 = checkpoint_dir(after_kill["root"], 2)
    assert convert_main(["mcore-to-hf", "--ckpt", str(step2), "--out", str(tmp_path / "hf")]) == 0
    got = load_file(tmp_path / "hf" / "model.safetensors")
    want = after_kill["recorded"][2]
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "hf" / "config.json").is_file()
    # reshard of a training checkpoint: a model-only checkpoint (sealed with the same manifest), convertible too
    assert convert_main(["reshard", "--ckpt", str(step2), "--out", str(tmp_path / "m"), "--tp", "1", "--pp",
                         "1"]) == 0
    assert read_manifest(tmp_path / "m")["kind"] == "model" and read_sidecar(tmp_path / "m")["tp"] == 1
    from oapl_megatron.trainer.checkpoint import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match=r"model-only checkpoint .* no optimizer"):
        load_checkpoint(tmp_path / "m", state=None, ctx=None)  # refused before the state is touched
    # an incomplete copy is refused before any rank starts, naming the file
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(step2, bad)
    (bad / "extra.pt").unlink()
    assert convert_main(["mcore-to-hf", "--ckpt", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad / 'extra.pt'} is missing" in capsys.readouterr().err
