"""Run one program in one sandbox: make its directory and cgroups, start the launcher, pump its pipes under a
deadline and output caps, kill what is left, and classify how it ended (:func:`run_one`)."""

from __future__ import annotations

import json
import logging
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from oapl_megatron.config.sandbox import SandboxConfig
from oapl_megatron.tasks.sandbox.launcher import LAUNCHER, SETUP_ERROR
from oapl_megatron.tasks.sandbox.resources import SLOTS, Cgroup, kill_uid
from oapl_megatron.tasks.sandbox.result import SandboxResult, SandboxUnavailable

if TYPE_CHECKING:
    from oapl_megatron.tasks.sandbox.isolation import Isolation

logger = logging.getLogger(__name__)

_CHUNK = 65536
_PATH = "/usr/local/bin:/usr/bin:/bin"


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


def run_one(
    iso: Isolation, program: str, stdin: bytes, limits: SandboxConfig, argv_extra: Sequence[str]
) -> SandboxResult:
    """Run ``program`` once at isolation level ``iso``; raises :class:`SandboxUnavailable` for setup failures."""
    slot = SLOTS.acquire(limits.max_slots, limits.uid_base) if iso.drop_uid else None
    uid = gid = None if slot is None else limits.uid_base + slot
    workdir = tempfile.mkdtemp(prefix="oapl_sbx_")
    cgroup: Cgroup | None = None
    proc: subprocess.Popen | None = None
    try:
        Path(workdir, "main.py").write_text(program, encoding="utf-8")
        if uid is not None:
            os.chown(workdir, uid, gid)
        inner = "/tmp" if iso.mount_ns else workdir
        if iso.cgroup_roots:
            cgroup = Cgroup.create(iso.cgroup_roots, limits)
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
            [os.path.realpath(sys.executable), "-I", "-S", "-c", LAUNCHER, json.dumps(spec)],
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
            SLOTS.release(slot)

    if err.startswith(SETUP_ERROR) and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 125:
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
        kill_uid(uid)


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
