"""Collective helpers of the checkpoint save and load: bounded barriers and one shared verdict per phase.

Every wait here is a world collective bounded by the world's process-group timeout (``parallel.timeout_s``);
with gloo the barrier is ``monitored_barrier``, so a timeout names the ranks that did not arrive. A failure on
any rank (bad file, rank 0 cannot write) is shared with all ranks through one ``all_gather_object``, so every
rank raises the same :class:`CheckpointError` instead of waiting for the others until the timeout. In a process
without a process group every helper degrades to the world of one.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from oapl_megatron.trainer.checkpoint.layout import CheckpointError


def world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _world_timeout() -> timedelta:
    """The default process group's timeout (the one given to init_process_group)."""
    for device in ("cpu", "cuda"):
        try:
            return dist.group.WORLD._get_backend(torch.device(device)).options._timeout
        except Exception:  # no backend for this device type, or a torch without these internals
            continue
    return dist.default_pg_timeout


def barrier(what: str) -> None:
    """World barrier with the world's timeout; a timeout names ``what`` and (gloo) the missing ranks."""
    rank, size = world()
    if size == 1:
        return
    timeout = _world_timeout()
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout)
        else:
            dist.barrier()
    except RuntimeError as exc:
        raise CheckpointError(f"rank {rank}: barrier '{what}' failed after up to {timeout}: {exc}") from exc


def all_gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a world of one); bounded by the world's timeout."""
    _, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def agree(what: str, error: str | None) -> None:
    """Share each rank's error (None = fine) with every rank; raise the same CheckpointError everywhere if any.

    A monitored barrier first (gloo: a rank that never arrives, e.g. because it died, is named), then one
    all_gather_object over the world; both bounded by the world's timeout."""
    barrier(what)
    errors = all_gather(error)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        lines = "\n".join(f"  rank {r}: {e}" for r, e in bad)
        raise CheckpointError(f"{what} failed on {len(bad)} of {len(errors)} ranks:\n{lines}")


def capture(fn: Callable, *args, **kwargs) -> tuple[Any, str | None]:
    """Run ``fn``; return (result, None) or (None, "Type: message") so the error can be shared by :func:`agree`."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # shared with all ranks by agree(), which raises
        return None, f"{type(exc).__name__}: {exc}"


def my_share(names: list[str]) -> list[str]:
    """This rank's round-robin share of ``names`` (for work split over ranks, e.g. checksums)."""
    rank, size = world()
    return names[rank::size]
