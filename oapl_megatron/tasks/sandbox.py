"""Run untrusted Python programs (model-written code) in a hardened, resource-limited sandbox.

Usage::

    from oapl_megatron.config.sandbox import SandboxConfig
    from oapl_megatron.tasks.sandbox import run_sandboxed, run_many

    res = run_sandboxed("print(input()[::-1])", b"abc\\n", SandboxConfig(wall_timeout_s=5))
    res.stdout, res.exit_code, res.limit_hit        # b"cba\\n", 0, None
    results = run_many(programs, stdins, limits, num_workers=4)   # one child process per program

How a program is contained (each layer is used when this machine permits it; a missing one is logged once as a
warning, or raises :class:`SandboxUnavailable` with ``require_isolation=True``; see :func:`isolation_report`):

* **process**: a launcher (this interpreter, ``-I -S``, running :data:`_LAUNCHER`) starts in its own session
  (``start_new_session``; no ``preexec_fn``, which is unsafe with threads), joins the sandbox's cgroups, unshares
  namespaces and execs the program with a clean environment: only PATH, LANG/LC_ALL, HOME=TMPDIR=the private
  directory, PYTHONHASHSEED=0 (deterministic set order), PYTHONDONTWRITEBYTECODE, PYTHONIOENCODING. The program
  interpreter runs with ``-s -S -B`` (no site-packages, so the project is not importable); ``-E`` is not needed
  because the whole environment is ours, and it would drop PYTHONHASHSEED.
* **namespaces** (root, or an unprivileged user namespace): a network namespace with no interfaces (not even
  loopback up), a pid namespace whose init is the launcher's child (when the program ends, or the launcher is
  killed, the kernel kills every process left in it: a ``setsid`` daemon cannot outlive the sandbox), and a mount
  namespace where the private directory is bind-mounted on ``/tmp`` (cwd and HOME), ``/var/tmp`` and ``/dev/shm``
  are small private tmpfs, and ``/proc`` shows only the sandbox's processes.
* **uid**: when we are root, the program runs as ``uid_base + slot`` (one uid per concurrent sandbox, no groups,
  ``PR_SET_NO_NEW_PRIVS``), so it cannot signal or ptrace our processes or the other sandboxes, cannot read
  root-only files, and RLIMIT_NPROC (which root ignores) applies.
* **cgroups** (v1 ``pids`` and ``memory``, when writable): ``pids.max`` stops fork and thread bombs across all
  descendants, ``memory.limit_in_bytes`` bounds the sum over processes, and at the end every pid left in the
  cgroup is killed before the cgroup is removed.
* **rlimits** on the program: CPU, AS (memory), FSIZE, NOFILE, NPROC (only under a sandbox uid), CORE=0.
* **wall time and output**: the caller reads stdout/stderr in 64 KiB chunks with a deadline; past the wall time
  or an output cap the whole process group, the pid namespace and the cgroup are SIGKILLed. Nothing is buffered
  past the caps.

The private directory is a fresh ``mkdtemp`` that is removed afterwards. Never ``shell=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from oapl_megatron.config.sandbox import SandboxConfig

logger = logging.getLogger(__name__)

# Linux clone(2) flags used by unshare(2).
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

_SETUP_ERROR = b"oapl-sandbox-setup-error:"  # launcher failures before exec start stderr with this marker
_CHUNK = 65536
_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxUnavailable(RuntimeError):
    """The sandbox could not be set up (a required isolation layer is missing or the launcher failed)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run. ``exit_code`` is None when the program died of a signal."""

    exit_code: int | None
    signal: int | None
    stdout: bytes  # at most max_stdout_bytes
    stderr: bytes  # at most max_stderr_bytes
    wall_s: float
    cpu_s: float  # user+sys of the launcher and the processes it reaped (best effort after a SIGKILL)
    timed_out: bool
    killed_reason: str | None  # why it was stopped: wall_timeout, stdout_cap, stderr_cap, signal:<NAME>
    limit_hit: str | None  # wall_time, cpu_time, memory, stdout, stderr, file_size, processes, open_files
    isolation: tuple[str, ...] = ()  # the layers that were active, e.g. ("netns", "pidns", "mountns", "uid", ...)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.limit_hit is None


# --------------------------------------------------------------------------------------------------------------
# The launcher: runs as the caller's user (root here) in the new session, sets up isolation, execs the program.
# It is a string run with ``python -I -S -c`` so that nothing of the project is imported in the child, and so
# that no Python code runs between fork and exec in the (multi-threaded) caller.
# --------------------------------------------------------------------------------------------------------------
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
spec = json.loads(sys.argv[1])
MARK = "oapl-sandbox-setup-error: "

def fail(what, err):
    os.write(2, (MARK + what + ": " + str(err) + "\n").encode())
    os._exit(125)

libc = ctypes.CDLL(None, use_errno=True)

def call(what, rc):
    if rc != 0:
        e = ctypes.get_errno()
        fail(what, os.strerror(e) + " (errno %d)" % e)

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
    for p in spec["cgroup_procs"]:
        write(p, str(os.getpid()))
except OSError as e:
    fail("join cgroup", e)

flags = spec["unshare"]
if flags:
    call("unshare(0x%x)" % flags, libc.unshare(flags))
if spec["user_ns"]:
    # Map ns-root to the caller's uid/gid so files and mounts work; setgroups must be denied first.
    try:
        write("/proc/self/setgroups", "deny")
        write("/proc/self/uid_map", "0 %d 1" % spec["outer_uid"])
        write("/proc/self/gid_map", "0 %d 1" % spec["outer_gid"])
    except OSError as e:
        fail("user namespace id maps", e)
if spec["mount_ns"]:
    MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
    call("make / private", libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))
    call("bind workdir on /tmp", libc.mount(spec["workdir"].encode(), b"/tmp", None, MS_BIND, None))
    opts = ("size=%d,mode=1777" % spec["tmpfs_bytes"]).encode()
    for d in (b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(d):
            call("tmpfs on " + d.decode(), libc.mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV, opts))

# Non-dumpable: the launcher and the pid-namespace init cannot be ptraced and their /proc files (environ, mem)
# belong to root, even for a program that is root inside a user namespace (exec makes the program dumpable
# again). Set after the id maps, which a non-dumpable process may not write.
call("PR_SET_DUMPABLE", libc.prctl(4, 0, 0, 0, 0))

def exec_program():
    try:
        os.chdir(spec["cwd"])
        for res, soft, hard in spec["rlimits"]:
            resource.setrlimit(res, (soft, hard))
        if spec["uid"] is not None:
            os.setgroups([])
            os.setresgid(spec["gid"], spec["gid"], spec["gid"])
            os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        call("no_new_privs", libc.prctl(38, 1, 0, 0, 0))  # PR_SET_NO_NEW_PRIVS: setuid binaries gain nothing
        os.closerange(3, 1 << 16)
        for s in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)  # CPython ignores these; exec keeps SIG_IGN, so reset them
        os.execve(spec["exe"], spec["argv"], dict(os.environ))
    except OSError as e:
        fail("exec program", e)

if not spec["pid_ns"]:
    exec_program()

# With a pid namespace the next child is its init (pid 1). init forks the program (so it is not pid 1 itself and
# signals behave normally), reaps orphans, and reports the program's wait status; when init exits the kernel
# kills every process left in the namespace.
r, w = os.pipe()
init = os.fork()
if init == 0:
    os.close(r)
    if spec["mount_ns"]:
        call("mount /proc", libc.mount(b"proc", b"/proc", b"proc", 2 | 4 | 8, None))
    prog = os.fork()
    if prog == 0:
        exec_program()
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == prog:
            os.write(w, b"%d\n" % status)
            os._exit(0)
os.close(w)
os.waitpid(init, 0)
data = os.read(r, 64)
if not data:
    fail("pid namespace init", "exited without reporting the program's status")
status = int(data)
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)  # die of the same signal so the caller sees it (RLIMIT_CORE=0: no core file)
    os._exit(128 + sig)
os._exit(os.WEXITSTATUS(status))
"""


# --------------------------------------------------------------------------------------------------------------
# Capability probing (once per process and isolation setting)
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Isolation:
    unshare: int
    user_ns: bool
    net_ns: bool
    pid_ns: bool
    mount_ns: bool
    drop_uid: bool
    cgroup_roots: tuple[tuple[str, str], ...]  # (controller, directory in which sandbox cgroups are made)
    interpreter: str

    def names(self) -> tuple[str, ...]:
        out = [n for n, on in (("userns", self.user_ns), ("netns", self.net_ns), ("pidns", self.pid_ns),
                               ("mountns", self.mount_ns), ("uid", self.drop_uid)) if on]
        return tuple(out + [f"cgroup:{c}" for c, _ in self.cgroup_roots])


_PROBE_LOCK = threading.Lock()
_PROBED: dict[tuple, _Isolation] = {}


def _world_executable(path: str) -> bool:
    """Whether an unprivileged uid with no groups can exec ``path`` (o+x on it and o+x on every parent dir)."""
    p = Path(path).resolve()
    try:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(d.stat().st_mode & stat.S_IXOTH for d in p.parents)
    except OSError:
        return False


def _interpreter_candidates(limits: SandboxConfig, unprivileged: bool) -> list[str]:
    if limits.python_executable:
        return [limits.python_executable]
    cands = [os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""), shutil.which("python3") or "",
             "/usr/bin/python3"]
    out = []
    for c in cands:
        if c and os.path.exists(c) and c not in out and (not unprivileged or _world_executable(c)):
            out.append(c)
    return out


def _cgroup_v1_roots(controllers: Sequence[str]) -> list[tuple[str, str]]:
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
            _remove_stale_cgroups(cand)
            break
    return roots


def _remove_stale_cgroups(root: str) -> None:
    """Remove sandbox cgroups left by processes that died mid-run (their names carry the owner's pid)."""
    for d in Path(root).glob("oapl_sbx_*_*"):
        try:
            owner = int(d.name.split("_")[2])
        except (IndexError, ValueError):
            continue
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        cg = _Cgroup({"stale": str(d)})
        cg.kill_all(timeout_s=1.0)
        cg.remove()


def _probe(limits: SandboxConfig) -> _Isolation:
    key = (limits.use_namespaces, limits.allow_network, limits.use_cgroups, limits.drop_privileges,
           limits.python_executable, limits.require_isolation)
    with _PROBE_LOCK:
        if key in _PROBED:
            return _PROBED[key]
        iso = _probe_uncached(limits)
        _PROBED[key] = iso
        return iso


def _probe_uncached(limits: SandboxConfig) -> _Isolation:
    missing: list[str] = []
    root = os.geteuid() == 0
    drop = root and limits.drop_privileges
    interps = _interpreter_candidates(limits, unprivileged=drop)
    if drop and not interps:
        missing.append("uid drop (no Python interpreter that an unprivileged uid can execute; set "
                       "sandbox.python_executable)")
        drop = False
        interps = _interpreter_candidates(limits, unprivileged=False)
    if not interps:
        raise SandboxUnavailable(f"no Python interpreter found for sandboxed programs ({limits.python_executable!r})")
    if root and not limits.drop_privileges:
        missing.append("uid drop (sandbox.drop_privileges=false: programs run as root)")
    cgroups: list[tuple[str, str]] = []
    if limits.use_cgroups:
        cgroups = _cgroup_v1_roots(("pids", "memory"))
        have = {c for c, _ in cgroups}
        for c in ("pids", "memory"):
            if c not in have:
                missing.append(f"{c} cgroup (no writable cgroup-v1 '{c}' hierarchy)")
    net = 0 if limits.allow_network else CLONE_NEWNET
    levels: list[tuple[int, bool]] = []
    if limits.use_namespaces:
        full = net | CLONE_NEWPID | CLONE_NEWNS
        levels += [(full, False)] if root else []
        levels += [(full | CLONE_NEWUSER, True)]
        if net:
            levels += [(net, False)] if root else []
            levels += [(net | CLONE_NEWUSER, True)]
    levels.append((0, False))
    chosen = None
    errors = []
    for flags, user_ns in levels:
        iso = _Isolation(
            unshare=flags, user_ns=user_ns, net_ns=bool(flags & CLONE_NEWNET), pid_ns=bool(flags & CLONE_NEWPID),
            mount_ns=bool(flags & CLONE_NEWNS), drop_uid=drop and not user_ns, cgroup_roots=tuple(cgroups),
            interpreter=interps[0],
        )
        try:
            res = _run(iso, "print(6 * 7)", b"", SandboxConfig(wall_timeout_s=30), ())
        except SandboxUnavailable as e:
            errors.append(f"unshare(0x{flags:x}): {e}")
            continue
        if res.stdout.strip() == b"42":
            chosen = iso
            break
        errors.append(f"unshare(0x{flags:x}): probe program gave exit={res.exit_code} sig={res.signal} "
                      f"stderr={res.stderr[-300:]!r}")
    if chosen is None:
        raise SandboxUnavailable("the sandbox launcher failed at every isolation level: " + "; ".join(errors))
    if limits.use_namespaces:
        for name, on in (("network namespace", chosen.net_ns or limits.allow_network),
                         ("pid namespace", chosen.pid_ns), ("mount namespace", chosen.mount_ns)):
            if not on:
                missing.append(f"{name} (unshare not permitted: {'; '.join(errors)[:300]})")
    else:
        missing.append("namespaces (sandbox.use_namespaces=false)")
    if missing:
        msg = ("sandbox isolation is degraded on this machine; missing: " + "; ".join(missing)
               + ". Untrusted programs are less contained (see oapl_megatron/tasks/sandbox.py).")
        if limits.require_isolation:
            raise SandboxUnavailable(msg)
        logger.warning(msg)
    return chosen


def isolation_report(limits: SandboxConfig | None = None) -> tuple[str, ...]:
    """The isolation layers that runs with ``limits`` get on this machine, e.g. ``("netns", "pidns", ...)``."""
    return _probe(limits or SandboxConfig()).names()


# --------------------------------------------------------------------------------------------------------------
# Per-sandbox resources: a uid slot and cgroups
# --------------------------------------------------------------------------------------------------------------
class _SlotPool:
    """Hands out distinct slot numbers to concurrent sandboxes (slot uid = uid_base + slot)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._used: set[int] = set()

    def acquire(self, max_slots: int, timeout_s: float = 600.0) -> int:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for s in range(max_slots):
                    if s not in self._used:
                        self._used.add(s)
                        return s
                left = deadline - time.monotonic()
                if left <= 0 or not self._cv.wait(left):
                    raise TimeoutError(f"no free sandbox slot after {timeout_s:.0f} s (sandbox.max_slots={max_slots})")

    def release(self, slot: int) -> None:
        with self._cv:
            self._used.discard(slot)
            self._cv.notify()


_SLOTS = _SlotPool()
_CG_COUNTER = iter(range(1 << 62))
_CG_LOCK = threading.Lock()


class _Cgroup:
    """One sandbox's cgroup directories (one per v1 controller)."""

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dict(dirs)  # controller -> cgroup directory

    @classmethod
    def create(cls, roots: Sequence[tuple[str, str]], limits: SandboxConfig) -> "_Cgroup":
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


def _kill_uid(uid: int) -> None:
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


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------
def _rlimits(limits: SandboxConfig, drop_uid: bool) -> list[tuple[int, int, int]]:
    out = [
        (resource.RLIMIT_CPU, limits.cpu_time_s, limits.cpu_time_s + 1),  # soft: SIGXCPU, hard: SIGKILL
        (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
        (resource.RLIMIT_FSIZE, limits.max_file_bytes, limits.max_file_bytes),
        (resource.RLIMIT_NOFILE, limits.max_open_files, limits.max_open_files),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if drop_uid:
        # RLIMIT_NPROC counts every process of the real uid; only meaningful under our own per-slot uid.
        out.append((resource.RLIMIT_NPROC, limits.max_processes, limits.max_processes))
    return out


def _clean_env(home: str) -> dict[str, str]:
    return {
        "PATH": _PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
    }


def run_sandboxed(
    program: str,
    stdin: bytes = b"",
    limits: SandboxConfig | None = None,
    argv_extra: Sequence[str] = (),
) -> SandboxResult:
    """Run the Python source ``program`` with ``stdin`` under ``limits``; never raises for the program's faults.

    Raises :class:`SandboxUnavailable` when the sandbox itself cannot be set up.
    """
    limits = limits or SandboxConfig()
    return _run(_probe(limits), program, stdin, limits, argv_extra)


def run_many(
    programs: Sequence[str],
    stdins: Sequence[bytes] | None = None,
    limits: SandboxConfig | None = None,
    num_workers: int = 2,
    argv_extra: Sequence[str] = (),
) -> list[SandboxResult]:
    """Run several programs, ``num_workers`` at a time (threads that each launch and watch one child process).

    Results are in the order of ``programs``. ``stdins`` (same length) defaults to empty input for each.
    """
    if stdins is None:
        stdins = [b""] * len(programs)
    if len(stdins) != len(programs):
        raise ValueError(f"run_many: stdins has {len(stdins)} entries for {len(programs)} programs")
    if num_workers < 1:
        raise ValueError(f"run_many: num_workers must be >= 1, got {num_workers}")
    limits = limits or SandboxConfig()
    iso = _probe(limits)  # probe once, before the threads start
    if num_workers == 1 or len(programs) <= 1:
        return [_run(iso, p, s, limits, argv_extra) for p, s in zip(programs, stdins)]
    with ThreadPoolExecutor(max_workers=min(num_workers, len(programs)), thread_name_prefix="sandbox") as ex:
        return list(ex.map(lambda ps: _run(iso, ps[0], ps[1], limits, argv_extra), zip(programs, stdins)))


def _run(
    iso: _Isolation, program: str, stdin: bytes, limits: SandboxConfig, argv_extra: Sequence[str]
) -> SandboxResult:
    slot = _SLOTS.acquire(limits.max_slots) if iso.drop_uid else None
    uid = gid = None if slot is None else limits.uid_base + slot
    workdir = tempfile.mkdtemp(prefix="oapl_sbx_")
    cgroup: _Cgroup | None = None
    proc: subprocess.Popen | None = None
    try:
        Path(workdir, "main.py").write_text(program, encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, gid)
        inner = "/tmp" if iso.mount_ns else workdir
        if iso.cgroup_roots:
            cgroup = _Cgroup.create(iso.cgroup_roots, limits)
        spec = {
            "cgroup_procs": cgroup.procs_files if cgroup else [],
            "unshare": iso.unshare,
            "user_ns": iso.user_ns,
            "outer_uid": os.geteuid(),
            "outer_gid": os.getegid(),
            "mount_ns": iso.mount_ns,
            "pid_ns": iso.pid_ns,
            "workdir": workdir,
            "cwd": inner,
            "tmpfs_bytes": limits.tmpfs_bytes,
            "rlimits": _rlimits(limits, uid is not None),
            "uid": uid,
            "gid": gid,
            "exe": iso.interpreter,
            "argv": [iso.interpreter, "-s", "-S", "-B", "main.py", *argv_extra],
        }
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [os.path.realpath(sys.executable), "-I", "-S", "-c", _LAUNCHER, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=workdir, env=_clean_env(inner), start_new_session=True, close_fds=True,
        )
        out, err, timed_out, cap = _pump(proc, stdin, limits, t0 + limits.wall_timeout_s, cgroup, uid, iso)
        wall = time.monotonic() - t0
        # Always kill what is left (a daemon in a degraded sandbox) while the unreaped launcher still reserves
        # its pid as the process-group id, then reap it.
        _kill_tree(proc, cgroup, uid, iso)
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = status
        counters = cgroup.counters() if cgroup else {}
    finally:
        if proc is not None:
            if proc.returncode is None:  # an exception above: make sure nothing survives
                _kill_tree(proc, cgroup, uid, iso)
                try:
                    os.waitpid(proc.pid, 0)
                except ChildProcessError:
                    pass
                proc.returncode = -9
            for f in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    f and f.close()
                except OSError:
                    pass
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(workdir, ignore_errors=True)
        if slot is not None:
            _SLOTS.release(slot)

    if err.startswith(_SETUP_ERROR) and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 125:
        raise SandboxUnavailable(err.decode("utf-8", "replace").strip())
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    cpu = rusage.ru_utime + rusage.ru_stime if rusage is not None else 0.0
    killed_reason, limit_hit = _classify(timed_out, cap, exit_code, sig, err, cpu, limits, counters)
    return SandboxResult(
        exit_code=exit_code, signal=sig, stdout=out, stderr=err, wall_s=wall, cpu_s=cpu, timed_out=timed_out,
        killed_reason=killed_reason, limit_hit=limit_hit, isolation=iso.names(),
    )


def _pump(proc, stdin: bytes, limits: SandboxConfig, deadline: float, cgroup, uid, iso):
    """Feed stdin and read stdout/stderr until both close, the deadline passes, or a cap is hit.

    Does not reap the launcher. Returns (stdout, stderr, timed_out, cap_hit).
    """
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    caps = {proc.stdout.fileno(): limits.max_stdout_bytes, proc.stderr.fileno(): limits.max_stderr_bytes}
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    view = memoryview(stdin)
    in_fd = proc.stdin.fileno()
    if view:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    exited_at = None
    timed_out, cap = False, None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is not None and now - exited_at > 0.5:
                # The launcher is gone but something still holds the pipes (only possible without a pid
                # namespace or cgroup): stop reading; the caller kills the leftovers.
                break
            for key, _ in sel.select(timeout=min(deadline - now, 0.25)):
                fd = key.fd
                if fd == in_fd:
                    try:
                        n = os.write(fd, view[:_CHUNK])
                        view = view[n:]
                    except BlockingIOError:
                        continue
                    except OSError:  # BrokenPipe: the program stopped reading; that is its business
                        view = view[:0]
                    if not view:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, _CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[fd]
                room = caps[fd] - len(buf)
                buf += chunk[:room]
                if len(chunk) > room:
                    cap = names[fd]
                    break
            if cap:
                break
            if exited_at is None and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                exited_at = time.monotonic()  # exited, not reaped (WNOWAIT)
    finally:
        sel.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), timed_out, cap


def _kill_tree(proc, cgroup, uid, iso) -> None:
    """SIGKILL the launcher's process group (which holds the pid-namespace init), then the cgroup, then the uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if cgroup is not None:
        cgroup.kill_all()
    if uid is not None and not iso.pid_ns and not iso.cgroup_roots:
        _kill_uid(uid)


def _classify(timed_out, cap, exit_code, sig, err: bytes, cpu: float, limits: SandboxConfig, counters):
    """(killed_reason, limit_hit) from how the run ended. Stderr sniffing only labels failures, never passes."""
    if timed_out:
        return "wall_timeout", "wall_time"
    if cap:
        return f"{cap}_cap", cap
    killed = f"signal:{signal.Signals(sig).name}" if sig else None
    if exit_code == 0:
        return None, None
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_time_s):
        return killed, "cpu_time"
    if sig == signal.SIGXFSZ or b"[Errno 27] File too large" in err:
        return killed, "file_size"
    if counters.get("mem_failcnt", 0) > 0 or counters.get("mem_oom_kills", 0) > 0 or b"MemoryError" in err:
        return killed, "memory"
    if counters.get("pids_refused", 0) > 0 or b"can't start new thread" in err:
        return killed, "processes"
    if b"[Errno 24] Too many open files" in err:
        return killed, "open_files"
    return killed, None
