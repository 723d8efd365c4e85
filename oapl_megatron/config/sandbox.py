"""Typed configs for running untrusted code: :class:`SandboxConfig` (limits, isolation) and :class:`CodeRewardConfig`.

Used by :func:`oapl_megatron.tasks.sandbox.run_sandboxed` and :func:`oapl_megatron.tasks.code_reward.code_reward`.
The defaults suit competitive-programming tests (one short Python program per test case). A run config holds a
:class:`CodeRewardConfig` in the code task's section (``task.code_reward``, see :mod:`oapl_megatron.config.task`).
"""

from __future__ import annotations

from pydantic import Field

from oapl_megatron.config.base import StrictModel

_MiB = 2**20


class SandboxConfig(StrictModel):
    """Limits and isolation for one sandboxed Python program (one test case)."""

    wall_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="Wall-clock limit; then the whole sandbox is killed."
    )
    cpu_time_s: int = Field(10, ge=1, le=3600, description="RLIMIT_CPU soft limit, seconds (SIGXCPU; hard = soft + 1).")
    memory_bytes: int = Field(
        1024 * _MiB, ge=64 * _MiB, description="RLIMIT_AS per process, and the memory cgroup limit of the sandbox."
    )
    max_file_bytes: int = Field(16 * _MiB, ge=0, description="RLIMIT_FSIZE: largest file the program may write.")
    max_open_files: int = Field(64, ge=16, le=65536, description="RLIMIT_NOFILE.")
    max_processes: int = Field(
        32, ge=1, le=4096, description="Processes + threads: pids cgroup limit and RLIMIT_NPROC of the sandbox uid."
    )
    max_stdout_bytes: int = Field(8 * _MiB, ge=1024, description="Stdout cap; past it the sandbox is killed.")
    max_stderr_bytes: int = Field(1 * _MiB, ge=1024, description="Stderr cap; past it the sandbox is killed.")
    tmpfs_bytes: int = Field(16 * _MiB, ge=_MiB, description="Size of the private /dev/shm and /var/tmp tmpfs.")
    allow_network: bool = Field(False, description="Keep the host network (no network namespace). Off for rewards.")
    use_namespaces: bool = Field(True, description="Private network, pid and mount namespaces when permitted.")
    use_cgroups: bool = Field(True, description="Per-sandbox pids/memory cgroups (v1) when writable.")
    drop_privileges: bool = Field(True, description="When root, run the program as an unprivileged per-slot uid.")
    uid_base: int = Field(
        61000, ge=1000, le=2**31 - 70000, description="First uid of the per-slot sandbox uids (uid_base + slot)."
    )
    max_slots: int = Field(256, ge=1, le=65536, description="Concurrent sandboxes per process (one uid each).")
    python_executable: str | None = Field(
        None, description="Interpreter for the program; None = this one if the sandbox uid can run it, else python3."
    )
    require_isolation: bool = Field(
        False, description="Fail (SandboxUnavailable) instead of warning when a namespace/cgroup/uid drop is missing."
    )


class CodeRewardConfig(StrictModel):
    """How a code response is scored against its tests (see :mod:`oapl_megatron.tasks.code_reward`)."""

    partial_credit: bool = Field(False, description="Reward = passed fraction; otherwise 1 only if all tests pass.")
    num_workers: int = Field(2, ge=1, le=256, description="Test cases run in parallel (one sandbox each).")
    stop_on_first_failure: bool = Field(
        True, description="Without partial credit, skip the remaining tests after a failure (saves time)."
    )
    max_tests: int | None = Field(None, ge=1, description="Use at most this many test cases (the first ones).")
    program_timeout_s: float | None = Field(
        None, gt=0, le=86400,
        description="Wall-clock budget of one response over all its tests; tests that would start past it are "
        "not run and fail as 'program_timeout', and each test's wall limit is cut to what is left. None = no budget.")
    answer_after: str | None = Field(
        "</think>", description="Code is searched only after the last occurrence of this marker; None = everywhere.")
    float_rel_tol: float = Field(1e-6, ge=0, le=1, description="Relative tolerance for numeric tokens.")
    float_abs_tol: float = Field(1e-6, ge=0, le=1, description="Absolute tolerance for numeric tokens.")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="Limits of each test-case run.")
