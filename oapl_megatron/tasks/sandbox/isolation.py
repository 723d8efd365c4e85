"""Which isolation layers this machine permits: probed once per process and isolation setting.

The probe tries the strongest level first (network + pid + mount namespaces as root, then in a user namespace,
then network only, then none) and keeps the first at which a probe program prints 42. A missing layer is logged
once as a warning, or raises :class:`SandboxUnavailable` with ``require_isolation=True``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import sys
import threading
from pathlib import Path

from oapl_megatron.config.sandbox import SandboxConfig
from oapl_megatron.tasks.sandbox.execute import run_one
from oapl_megatron.tasks.sandbox.launcher import CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER
from oapl_megatron.tasks.sandbox.resources import cgroup_v1_roots
from oapl_megatron.tasks.sandbox.result import SandboxUnavailable

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Isolation:
    """One isolation level: the unshare flags the launcher uses, the uid drop, the cgroup roots, the interpreter."""

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
_PROBED: dict[tuple, Isolation] = {}


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


def probe(limits: SandboxConfig) -> Isolation:
    """The isolation that runs with ``limits`` get here (cached per isolation setting)."""
    key = (limits.use_namespaces, limits.allow_network, limits.use_cgroups, limits.drop_privileges,
           limits.python_executable, limits.require_isolation)
    with _PROBE_LOCK:
        if key in _PROBED:
            return _PROBED[key]
        iso = _probe_uncached(limits)
        _PROBED[key] = iso
        return iso


def _probe_uncached(limits: SandboxConfig) -> Isolation:
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
        cgroups = cgroup_v1_roots(("pids", "memory"))
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
        iso = Isolation(
            unshare=flags, user_ns=user_ns, net_ns=bool(flags & CLONE_NEWNET), pid_ns=bool(flags & CLONE_NEWPID),
            mount_ns=bool(flags & CLONE_NEWNS), drop_uid=drop and not user_ns, cgroup_roots=tuple(cgroups),
            interpreter=interps[0],
        )
        try:
            res = run_one(iso, "print(6 * 7)", b"", SandboxConfig(wall_timeout_s=30), ())
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
               + ". Untrusted programs are less contained (see oapl_megatron/tasks/sandbox/__init__.py).")
        if limits.require_isolation:
            raise SandboxUnavailable(msg)
        logger.warning(msg)
    return chosen


def isolation_report(limits: SandboxConfig | None = None) -> tuple[str, ...]:
    """The isolation layers that runs with ``limits`` get on this machine, e.g. ``("netns", "pidns", ...)``."""
    return probe(limits or SandboxConfig()).names()

