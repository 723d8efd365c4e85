"""Run a script under torchrun with N CPU ranks (gloo) and a hard timeout; used by the multi-rank tests.

Each worker script writes what it measured to ``$OAPL_TEST_OUT/rank{R}.json`` (or any file it likes under that
directory); the test reads those files and asserts. On failure the tail of every rank's output is shown.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, nproc: int, out_dir: Path, args: list[str] = (), timeout: float = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Launch ``script`` on ``nproc`` local ranks; raise AssertionError with the output if it fails or times out."""
    full_env = dict(os.environ)
    full_env.update({
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TORCHDYNAMO_DISABLE": "1",
        "OAPL_TEST_OUT": str(out_dir),
        "PYTHONPATH": f"{REPO}{os.pathsep}{full_env.get('PYTHONPATH', '')}",
    })
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--tee=3", f"--log-dir={out_dir / 'torchrun_logs'}", str(script), *args]
    # --standalone picks its own rendezvous port; drop --master-port then.
    cmd = [c for c in cmd if not c.startswith("--master-port")]
    try:
        proc = subprocess.run(cmd, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-6000:]
        raise AssertionError(f"torchrun {script} timed out after {timeout}s; output tail:\n{out!r}") from None
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} exited {proc.returncode}\n--- stdout tail ---\n{proc.stdout[-6000:]}\n"
            f"--- stderr tail ---\n{proc.stderr[-6000:]}"
        )
    return proc
