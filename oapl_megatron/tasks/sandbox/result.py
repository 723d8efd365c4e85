"""What a sandboxed run returns (:class:`SandboxResult`) and the error for a sandbox that cannot start."""

from __future__ import annotations

import dataclasses


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
