"""The public entry points: :func:`run_sandboxed` (one program) and :func:`run_many` (several, N at a time)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from oapl_megatron.config.sandbox import SandboxConfig
from oapl_megatron.tasks.sandbox.execute import run_one
from oapl_megatron.tasks.sandbox.isolation import probe
from oapl_megatron.tasks.sandbox.result import SandboxResult


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
    return run_one(probe(limits), program, stdin, limits, argv_extra)


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
    iso = probe(limits)  # probe once, before the threads start
    if num_workers == 1 or len(programs) <= 1:
        return [run_one(iso, p, s, limits, argv_extra) for p, s in zip(programs, stdins)]
    with ThreadPoolExecutor(max_workers=min(num_workers, len(programs)), thread_name_prefix="sandbox") as ex:
        return list(ex.map(lambda ps: run_one(iso, ps[0], ps[1], limits, argv_extra), zip(programs, stdins)))

