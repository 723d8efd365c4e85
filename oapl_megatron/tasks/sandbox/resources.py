"""Per-sandbox resources: a uid slot (uid_base + slot), cgroup-v1 directories (pids, memory) and their cleanup."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from oapl_megatron.config.sandbox import SandboxConfig
from oapl_megatron.tasks.sandbox.result import SandboxUnavailable

logger = logging.getLogger(__name__)


class SlotPool:
    """Hands out slot numbers (slot uid = uid_base + slot) that no other sandbox on this machine holds.

    Within a process a set keeps slots distinct; across processes (several runs, test sessions, worktrees on one
    machine) each slot is also held through an exclusive ``flock`` on ``<tmp>/oapl_sandbox_slots/uid_<uid>.lock``,
    which the kernel releases when the holder dies. Without it two processes would run programs under the same
    uid, and one program's processes would count against the other's RLIMIT_NPROC (its exec then fails with
    EAGAIN) and be visible to it.
    """

    LOCK_DIR = Path(tempfile.gettempdir()) / "oapl_sandbox_slots"

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._used: dict[int, int] = {}  # slot -> fd of its lock file

    def _try_lock(self, uid: int) -> int | None:
        self.LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.LOCK_DIR / f"uid_{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def acquire(self, max_slots: int, uid_base: int, timeout_s: float = 600.0) -> int:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for s in range(max_slots):
                    if s not in self._used:
                        fd = self._try_lock(uid_base + s)
                        if fd is not None:
                            self._used[s] = fd
                            return s
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no free sandbox slot after {timeout_s:.0f} s (sandbox.max_slots={max_slots}; "
                                       f"slots held by other processes are locked under {self.LOCK_DIR})")
                # a release here notifies; one in another process does not: poll
                self._cv.wait(min(left, 0.05))

    def release(self, slot: int) -> None:
        with self._cv:
            fd = self._used.pop(slot, None)
            if fd is not None:
                os.close(fd)  # closing the only descriptor drops the flock
            self._cv.notify()


SLOTS = SlotPool()
_CG_COUNTER = iter(range(1 << 62))
_CG_LOCK = threading.Lock()


class Cgroup:
    """One sandbox's cgroup directories (one per v1 controller)."""

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dict(dirs)  # controller -> cgroup directory

    @classmethod
    def create(cls, roots: Sequence[tuple[str, str]], limits: SandboxConfig) -> "Cgroup":
        """Make ``oapl_sbx_<our pid>_<n>`` under each root and write the limits."""
        with _CG_LOCK:
            n = next(_CG_COUNTER)
        name = f"oapl_sbx_{os.getpid()}_{n}"
        self = cls({})
        try:
            for ctrl, root in roots:
                d = os.path.join(root, name)
                os.mkdir(d)
                self.dirs[ctrl] = d
                if ctrl == "pids":
                    # +2: the launcher and the pid-namespace init live in the cgroup too.
                    Path(d, "pids.max").write_text(str(limits.max_processes + 2))
                elif ctrl == "memory":
                    # The launcher and init (~20 MB) are charged here as well.
                    Path(d, "memory.limit_in_bytes").write_text(str(limits.memory_bytes + 64 * 2**20))
                    try:  # also cap swap when swap accounting exists, so the limit cannot be dodged by swapping
                        Path(d, "memory.memsw.limit_in_bytes").write_text(str(limits.memory_bytes + 64 * 2**20))
                    except OSError:
                        pass
        except OSError as e:
            self.remove()
            raise SandboxUnavailable(f"cannot create sandbox cgroup {name}: {e}") from e
        return self

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files:
            try:
                out.update(int(x) for x in Path(f).read_text().split())
            except OSError:
                pass
        return out

    def kill_all(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process in the cgroup until it is empty. pids.max bounds how many can appear meanwhile."""
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.pids()
            if not pids:
                return True
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                logger.error("sandbox cgroup %s still has processes %s after %.0f s of SIGKILL",
                             list(self.dirs.values()), sorted(pids), timeout_s)
                return False
            time.sleep(0.005)

    def counters(self) -> dict[str, int]:
        out = {}
        if "pids" in self.dirs:
            try:  # "max N": fork/clone calls refused by pids.max
                out["pids_refused"] = int(Path(self.dirs["pids"], "pids.events").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                pass
        if "memory" in self.dirs:
            try:
                out["mem_failcnt"] = int(Path(self.dirs["memory"], "memory.failcnt").read_text())
                # failcnt stays 0 when reclaim fails straight into the OOM killer; oom_kill counts the kills.
                for line in Path(self.dirs["memory"], "memory.oom_control").read_text().splitlines():
                    if line.startswith("oom_kill "):
                        out["mem_oom_kills"] = int(line.split()[1])
            except (OSError, ValueError):
                pass
        return out

    def remove(self) -> None:
        for d in list(self.dirs.values()):
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # EBUSY while the kernel finishes tearing down exited tasks.
                    if time.monotonic() > deadline:
                        logger.error("cannot remove sandbox cgroup %s: %s", d, e)
                        break
                    time.sleep(0.01)
        self.dirs.clear()


def kill_uid(uid: int) -> None:
    """Fallback cleanup without a pid namespace or cgroup: SIGKILL every process whose real uid is ``uid``."""
    for _ in range(50):
        found = False
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/status") as f:
                    for line in f:
                        if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                            break  # zombies (e.g. our unreaped launcher) are already dead
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                found = True
                                os.kill(int(p), signal.SIGKILL)
                            break
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)



def cgroup_v1_roots(controllers: Sequence[str]) -> list[tuple[str, str]]:
    """For each v1 controller: the directory of our own cgroup (or the hierarchy root) where we may mkdir."""
    mounts: dict[str, str] = {}
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            fields, post_f = pre.split(), post.split()
            if len(post_f) >= 3 and post_f[0] == "cgroup":
                opts = set(post_f[2].split(","))
                for c in controllers:
                    if c in opts and fields[3] == "/":
                        mounts.setdefault(c, fields[4])
        own: dict[str, str] = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for c in ctrls.split(","):
                own[c] = path
    except OSError:
        return []
    roots = []
    for c in controllers:
        if c not in mounts:
            continue
        for cand in (os.path.join(mounts[c], own.get(c, "/").lstrip("/")), mounts[c]):
            test = os.path.join(cand, f"oapl_sbx_probe_{os.getpid()}")
            try:
                os.mkdir(test)
                os.rmdir(test)
            except OSError:
                continue
            roots.append((c, cand))
            remove_stale_cgroups(cand)
            break
    return roots


def remove_stale_cgroups(root: str) -> None:
    """Remove sandbox cgroups left by processes that died mid-run (their names carry the owner's pid)."""
    for d in Path(root).glob("oapl_sbx_*_*"):
        try:
            owner = int(d.name.split("_")[2])
        except (IndexError, ValueError):
            continue
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        cg = Cgroup({"stale": str(d)})
        cg.kill_all(timeout_s=1.0)
        cg.remove()

