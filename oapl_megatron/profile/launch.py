"""Launch a profiling worker module on N local ranks under torchrun, with a hard timeout.

Workers write their results as JSON into the directory passed as ``--out``; the launcher returns it parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


class WorkerError(RuntimeError):
    """A profiling worker run failed or timed out; the message carries the tail of its output."""


def run_workers(module: str, nproc: int, out_dir: Path, args: list[str], timeout_s: float,
                threads_per_rank: int | None = None) -> dict:
    """``torchrun --standalone --nproc-per-node nproc -m module --out out_dir args``; returns out_dir/result.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads_per_rank is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads_per_rank)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
           "--out", str(out_dir), *args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-3000:]
        raise WorkerError(f"{module} on {nproc} ranks timed out after {timeout_s:.0f} s; output tail:\n{tail}") \
            from None
    if proc.returncode != 0:
        raise WorkerError(f"{module} on {nproc} ranks exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
                          f"\n--- stderr ---\n{proc.stderr[-3000:]}")
    result = out_dir / "result.json"
    if not result.is_file():
        raise WorkerError(f"{module} on {nproc} ranks wrote no {result}; stderr tail:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())
