"""Before a Slurm attempt starts on a node: stop what earlier attempts of the same run left behind, clear stale
``/dev/shm`` segments. Run once per node by the batch script (``srun --ntasks-per-node=1``)::

    OAPL_RUN_TAG=/abs/run_dir OAPL_ATTEMPT_TAG=<job>.<attempt> python -m oapl_megatron.launch.node_cleanup

Leftovers are found by the tags the batch script exports to every process of the run (inherited by torchrun,
trainer ranks, engine servers and vLLM's workers): a process of this user whose environment has this run's
``OAPL_RUN_TAG`` and another ``OAPL_ATTEMPT_TAG`` is stopped (SIGTERM, then SIGKILL). Nothing is matched by
name, so other jobs and users on a shared node are never touched. A ``/dev/shm`` entry is removed only if this
user owns it, its name is one torch/vLLM/multiprocessing create, it is older than a minute, and no process has it
open or mapped.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

RUN_TAG = "OAPL_RUN_TAG"
ATTEMPT_TAG = "OAPL_ATTEMPT_TAG"
SHM_PREFIXES = ("torch_", "psm_", "vllm", "sem.mp-", "nccl-", "sem.loky")


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def leftovers(run_tag: str, attempt_tag: str) -> list[int]:
    """PIDs of this user's processes that belong to ``run_tag`` but to another attempt than ``attempt_tag``."""
    me, uid = os.getpid(), os.getuid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        env = _environ(int(entry.name))
        if env.get(RUN_TAG) == run_tag and env.get(ATTEMPT_TAG, attempt_tag) != attempt_tag:
            found.append(int(entry.name))
    return found


def stop(pids: list[int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM, wait ≤ ``grace_s``, SIGKILL what is left; return the pids that needed SIGKILL."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _shm_in_use() -> set[str]:
    """Every /dev/shm path some process has open or mapped (the processes this user can inspect)."""
    used: set[str] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    used.add(target.split(" (deleted)")[0])
            for line in (entry / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    used.add(line[line.index("/dev/shm/"):].split(" (deleted)")[0])
        except OSError:
            continue
    return used


def clean_shm(root: Path = Path("/dev/shm"), min_age_s: float = 60.0) -> list[str]:
    """Remove stale segments (see the module docstring); return their names."""
    if not root.is_dir():
        return []
    uid, now = os.getuid(), time.time()
    used = _shm_in_use()
    removed = []
    for p in root.iterdir():
        try:
            st = p.lstat()
        except OSError:
            continue
        if st.st_uid != uid or not p.name.startswith(SHM_PREFIXES) or now - st.st_mtime < min_age_s \
                or str(p) in used or not p.is_file():
            continue
        try:
            p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shm-min-age-s", type=float, default=60.0)
    args = ap.parse_args(argv)
    run_tag, attempt_tag = os.environ.get(RUN_TAG), os.environ.get(ATTEMPT_TAG)
    if not run_tag or not attempt_tag:
        print(f"node_cleanup: {RUN_TAG} and {ATTEMPT_TAG} must be set (the batch script exports them)",
              file=sys.stderr)
        return 2
    pids = leftovers(run_tag, attempt_tag)
    killed = stop(pids)
    shm = clean_shm(min_age_s=args.shm_min_age_s)
    print(f"{socket.gethostname()}: stopped {len(pids)} leftover process(es) of {run_tag} {pids}"
          f"{f' ({len(killed)} needed SIGKILL)' if killed else ''}; removed {len(shm)} stale /dev/shm entr(ies)"
          f"{' ' + str(shm[:10]) if shm else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
