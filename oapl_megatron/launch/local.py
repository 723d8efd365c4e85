"""One node: torchrun with N trainer ranks, the engines spawned by rank 0 on the GPUs the trainer leaves free.

``oapl-launch local CONFIG [overrides] [--resume] [--nproc N]`` (or ``launch/torchrun.sh``) takes the same
arguments as ``oapl-train`` and adds what a bare ``torchrun`` leaves to the user: the rank count
(``--nproc``, ``launch.trainer_ranks_per_node``, else every GPU the local engines leave, tp × pp on CPU), the
placement printout, and teardown —
the job runs in its own session; when any part dies torchrun stops the other ranks, rank 0's engines die with it
(``PR_SET_PDEATHSIG``), and this launcher then kills every process it has seen in the job that is still alive.
SIGINT/SIGTERM to the launcher are forwarded. The exit code is torchrun's (non-zero when any part failed).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil


def local_gpu_count() -> int:
    """GPUs this node shows (CUDA_VISIBLE_DEVICES, else nvidia-smi); 0 without a driver. No torch import."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def torchrun_command(config: str, overrides: list[str], nproc: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "oapl_megatron.entrypoints.train", config, *overrides,
            *(["--resume"] if resume else [])]


def run_job(cmd: list[str], env: dict | None = None, grace_s: float = 30.0, poll_s: float = 0.5) -> int:
    """Run ``cmd`` in its own session until it exits; then leave no process of it behind. Returns its exit code."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    seen: dict[int, float] = {}  # pid → create_time of every descendant observed (engines start new sessions)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                for c in root.children(recursive=True):
                    seen.setdefault(c.pid, c.create_time())
            except psutil.Error:
                pass
            time.sleep(poll_s)
        return proc.returncode
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        reap(seen, grace_s)


def reap(seen: dict[int, float], grace_s: float) -> list[int]:
    """SIGTERM then SIGKILL every still-running process of ``seen`` (pid reuse excluded by create time)."""
    alive = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=5)
    if alive:
        print(f"[oapl-launch] stopped {len(alive)} leftover process(es) of the job: {[p.pid for p in alive]}",
              file=sys.stderr, flush=True)
    return [p.pid for p in alive]
