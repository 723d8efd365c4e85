"""Run untrusted Python programs (model-written code) in a hardened, resource-limited sandbox.

Usage::

    from oapl_megatron.config.sandbox import SandboxConfig
    from oapl_megatron.tasks.sandbox import run_sandboxed, run_many

    res = run_sandboxed("print(input()[::-1])", b"abc\\n", SandboxConfig(wall_timeout_s=5))
    res.stdout, res.exit_code, res.limit_hit        # b"cba\\n", 0, None
    results = run_many(programs, stdins, limits, num_workers=4)   # one child process per program

How a program is contained (each layer is used when this machine permits it; a missing one is logged once as a
warning, or raises :class:`SandboxUnavailable` with ``require_isolation=True``; see :func:`isolation_report`):

* **process**: a launcher (this interpreter, ``-I -S``, running :data:`launcher.LAUNCHER`) starts in its own session
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
* **uid**: when we are root, the program runs as ``uid_base + slot`` (one uid per concurrent sandbox on the
  machine: slots are locked across processes; no groups, ``PR_SET_NO_NEW_PRIVS``), so it cannot signal or ptrace
  our processes or the other sandboxes, cannot read root-only files, and RLIMIT_NPROC (which root ignores) applies.
* **cgroups** (v1 ``pids`` and ``memory``, when writable): ``pids.max`` stops fork and thread bombs across all
  descendants, ``memory.limit_in_bytes`` bounds the sum over processes, and at the end every pid left in the
  cgroup is killed before the cgroup is removed.
* **rlimits** on the program: CPU, AS (memory), FSIZE, NOFILE, NPROC (only under a sandbox uid), CORE=0.
* **wall time and output**: the caller reads stdout/stderr in 64 KiB chunks with a deadline; past the wall time
  or an output cap the whole process group, the pid namespace and the cgroup are SIGKILLed. Nothing is buffered
  past the caps.

The private directory is a fresh ``mkdtemp`` that is removed afterwards. Never ``shell=True``.

Modules: :mod:`.run` (the two entry points), :mod:`.execute` (one program in one sandbox), :mod:`.isolation`
(what this machine permits, probed once), :mod:`.resources` (uid slots, cgroups, cleanup), :mod:`.launcher` (the
script that sets up isolation in the child), :mod:`.result` (the result type and the setup error).
"""

from oapl_megatron.tasks.sandbox.isolation import isolation_report
from oapl_megatron.tasks.sandbox.result import SandboxResult, SandboxUnavailable
from oapl_megatron.tasks.sandbox.run import run_many, run_sandboxed

__all__ = ["SandboxResult", "SandboxUnavailable", "isolation_report", "run_many", "run_sandboxed"]
