"""Data plane of weight sync: a dedicated process group and a sender/receiver pair over it.

The group is separate from torch's default group (the trainer's Megatron groups are untouched) and is formed by
the trainer's sender (rank 0) and every inference worker: engine ``e`` with tensor-parallel size ``tp_e`` owns
ranks ``offset_e .. offset_e + tp_e - 1`` where ``offset_e = 1 + Σ_{j<e} tp_j``; world size ``1 + Σ tp_e``.

Two implementations of one small interface (STYLE principle 9):

* ``gloo`` – CPU tensors over TCP. Used on CPU machines and in tests. (vLLM's PyNcclCommunicator constructs
  *silently disabled* on CPU and its broadcast is a no-op, so it must never be chosen there: :func:`resolve_backend`
  refuses ``nccl`` without CUDA.)
* ``nccl`` – CUDA tensors on the current device.

Collective contract (principle 10): every rank of the group calls the same sequence of ``broadcast`` calls with
buffers of identical sizes (derived from the shared :class:`~oapl_megatron.weight_sync.bucket.BucketPlan`); rank 0
sends, all others receive. Each call is asynchronous and returns a :class:`Pending`; ``Pending.wait`` blocks for at
most the group's ``timeout_s`` and raises :class:`TransportError` (naming the group and the operation) instead of
hanging when a peer has died.

Use::

    store = open_rendezvous("0.0.0.0", port=0, world_size=W, timeout_s=60)   # trainer, before telling engines
    group = WeightGroup.join(host, store.port, rank=0, world_size=W, backend="gloo", timeout_s=60, store=store)
    sender = make_sender(group); pending = sender.send(buf); pending.wait()
    # on an engine worker:
    group = WeightGroup.join(host, port, rank=offset + tp_rank, world_size=W, backend="gloo", timeout_s=60)
    receiver = make_receiver(group); pending = receiver.recv_into(buf); pending.wait()
"""

from __future__ import annotations

import datetime
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist

from oapl_megatron.parallel.torch_compat import nccl_options


class TransportError(RuntimeError):
    """A data-plane operation failed or timed out; the message names the group rank and the operation."""


def resolve_backend(backend: str) -> str:
    """``auto`` → ``nccl`` when CUDA is available, else ``gloo``; refuses ``nccl`` on a machine without CUDA."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("weight_sync.backend='nccl' needs CUDA; this process has none (use 'gloo' or 'auto')")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight_sync.backend must be auto|gloo|nccl, got {backend!r}")
    return backend


def open_rendezvous(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's TCP store. ``port=0`` binds a free port (read it back from ``store.port``), so the trainer can
    create the store first and then send the real port to the engines – no guess-a-free-port race."""
    return dist.TCPStore(host, port, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


@dataclass
class WeightGroup:
    """One member's handle on the dedicated weight-sync group."""

    pg: dist.ProcessGroup
    store: dist.Store
    rank: int
    world_size: int
    backend: str
    timeout_s: float
    device: torch.device

    @staticmethod
    def join(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float,
             store: dist.TCPStore | None = None, group_name: str = "oapl_weight_sync") -> "WeightGroup":
        """Join the group (blocking until all ``world_size`` members have joined, at most ``timeout_s``).

        Rank 0 passes the store it opened with :func:`open_rendezvous`; other ranks connect to ``host:port``.
        """
        backend = resolve_backend(backend)
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            if store is None:
                if rank == 0:
                    store = open_rendezvous(host, port, world_size, timeout_s)
                else:
                    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
            prefix = dist.PrefixStore(f"{group_name}/", store)
            if backend == "gloo":
                pg = dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
                device = torch.device("cpu")
            else:
                pg = dist.ProcessGroupNCCL(prefix, rank, world_size, nccl_options(timeout))
                device = torch.device("cuda", torch.cuda.current_device())
        except Exception as e:  # the store/pg errors do not say which group or rank this was
            raise TransportError(f"weight-sync group {host}:{port} ({backend}): rank {rank}/{world_size} could not "
                                 f"join within {timeout_s:.0f}s: {e}") from e
        return WeightGroup(pg=pg, store=store, rank=rank, world_size=world_size, backend=backend,
                           timeout_s=timeout_s, device=device)

    def close(self) -> None:
        try:
            self.pg.shutdown()
        except Exception:  # a group whose peer died may fail to shut down cleanly; nothing left to release
            pass


class Pending:
    """An in-flight broadcast; ``wait()`` returns when it is done or raises :class:`TransportError`."""

    def __init__(self, work, group: WeightGroup, what: str, buf: torch.Tensor | None = None):
        # ``buf`` is held until the operation is done: a sender may pass a view of a tensor it then drops
        self._work, self._group, self._what, self._buf = work, group, what, buf

    def wait(self) -> None:
        g = self._group
        try:
            ok = self._work.wait(datetime.timedelta(seconds=g.timeout_s))
        except Exception as e:
            raise TransportError(f"weight-sync {g.backend} rank {g.rank}/{g.world_size}: {self._what} failed: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if ok is False:
            raise TransportError(f"weight-sync {g.backend} rank {g.rank}/{g.world_size}: {self._what} did not "
                                 f"finish within {g.timeout_s:.0f}s")


class WeightSender(ABC):
    """Rank 0: broadcasts flat uint8 buffers to every receiver."""

    checksum_algo: str

    def __init__(self, group: WeightGroup):
        if group.rank != 0:
            raise ValueError(f"only rank 0 sends weights; this member is rank {group.rank}")
        self.group = group
        self._bufs: list[torch.Tensor] = []

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.group.device)

    def bucket_buffers(self, nbytes: int, count: int = 2) -> list[torch.Tensor]:
        """``count`` pack buffers of ≥ ``nbytes``, kept between syncs: fresh multi-MiB allocations are paid in page
        faults on every sync (measured: 64 MiB buckets packed 5x slower into fresh buffers)."""
        if len(self._bufs) != count or any(b.numel() < nbytes for b in self._bufs):
            self._bufs = [self.alloc(nbytes) for _ in range(count)]
        return self._bufs

    @abstractmethod
    def send(self, buf: torch.Tensor, what: str) -> Pending: ...


class WeightReceiver(ABC):
    """Ranks ≥ 1: receive the buffers rank 0 broadcasts, in the same order."""

    checksum_algo: str

    def __init__(self, group: WeightGroup, keep_staging: bool | None = None):
        if group.rank == 0:
            raise ValueError("rank 0 is the sender; receivers have rank ≥ 1")
        self.group = group
        # Keeping the staging buffer between syncs costs one model copy of memory but saves first-touch page
        # faults on every sync; default: keep it in host memory, free it on an accelerator.
        self.keep_staging = keep_staging
        self._staging: torch.Tensor | None = None

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.group.device)

    def staging_buffer(self, nbytes: int, device: torch.device | None = None) -> torch.Tensor:
        """The flat buffer a whole sync is staged in, on ``device`` (default: the group's). Host staging of a CUDA
        group is pinned (fast, asynchronous copies both ways). When kept, it is reused by the next sync, so the
        previous sync's staged tensors (views of it) must have been loaded or dropped by then."""
        device = self.group.device if device is None else torch.device(device)
        keep = device.type == "cpu" if self.keep_staging is None else self.keep_staging
        if not keep:
            self._staging = None
            return self._alloc_staging(nbytes, device)
        if self._staging is None or self._staging.numel() < nbytes or self._staging.device != device:
            self._staging = None
            self._staging = self._alloc_staging(nbytes, device)
        return self._staging[:nbytes]

    def _alloc_staging(self, nbytes: int, device: torch.device) -> torch.Tensor:
        pin = device.type == "cpu" and self.group.device.type == "cuda"
        return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)

    @abstractmethod
    def recv_into(self, buf: torch.Tensor, what: str) -> Pending: ...


def _broadcast(group: WeightGroup, buf: torch.Tensor, what: str) -> Pending:
    if buf.device != group.device:
        raise ValueError(f"{what}: buffer on {buf.device}, but the {group.backend} group moves {group.device} tensors")
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    try:
        work = group.pg.broadcast([buf], opts)
    except Exception as e:
        raise TransportError(f"weight-sync {group.backend} rank {group.rank}: posting {what} failed: {e}") from e
    return Pending(work, group, what, buf)


class GlooSender(WeightSender):
    checksum_algo = "crc32"

    def send(self, buf: torch.Tensor, what: str) -> Pending:
        return _broadcast(self.group, buf, what)


class GlooReceiver(WeightReceiver):
    checksum_algo = "crc32"

    def recv_into(self, buf: torch.Tensor, what: str) -> Pending:
        return _broadcast(self.group, buf, what)


class NcclSender(WeightSender):
    # Checksums of GPU buckets are computed on the GPU (no device→host copy of the data).
    checksum_algo = "wsum64"

    def send(self, buf: torch.Tensor, what: str) -> Pending:
        return _broadcast(self.group, buf, what)


class NcclReceiver(WeightReceiver):
    checksum_algo = "wsum64"

    def recv_into(self, buf: torch.Tensor, what: str) -> Pending:
        return _broadcast(self.group, buf, what)


def make_sender(group: WeightGroup) -> WeightSender:
    return GlooSender(group) if group.backend == "gloo" else NcclSender(group)


def make_receiver(group: WeightGroup, keep_staging: bool | None = None) -> WeightReceiver:
    return (GlooReceiver if group.backend == "gloo" else NcclReceiver)(group, keep_staging)
