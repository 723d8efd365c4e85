"""One weight sync, trainer → every engine: metadata, pack, broadcast, verify, load, new version.

Two halves that run in different processes:

* :func:`send_weights` – rank 0 of the weight group (the trainer's sender). Streams ``(hf_name, full tensor)``
  pairs into fixed-size buckets (double-buffered: bucket k+1 is packed while bucket k is on the wire), broadcasts
  them, then broadcasts the per-bucket checksums it computed.
* :func:`receive_weights` – every engine worker (ranks ≥ 1). Receives the same bucket sequence into one flat
  staging buffer (the full tensors are zero-copy views of it; staged, not yet loaded) — directly, or through at
  most K bucket buffers on the GPU when the staging buffer is in host memory (bounded GPU memory) — receives the
  sender's checksums and compares them with its own. Loading is a separate step (the engine's ``commit``) so
  that **no engine loads anything unless every engine verified every bucket**: a corrupted or failed sync leaves
  all engines on their previous version.

:func:`run_sync` orchestrates one sync from the trainer over a list of :class:`SyncTarget` (one per engine; the
engine group implements it over its control plane). Phases and what each waits on (every wait is bounded):

=========  =====================================================================================================
meta       send :class:`SyncMeta` to each engine; the engine starts receiving (its reply comes after ``verify``)
broadcast  rank 0 broadcasts buckets + checksums; each op bounded by ``timeout_s`` (gloo/NCCL group timeout)
verify     wait for every engine's receive reply (≤ ``timeout_s`` + margin); mismatch → abort all, keep version
load       every engine loads its staged tensors in place, resets its prefix cache, takes the new version
=========  =====================================================================================================

A failure raises :class:`SyncError` naming the engine and the phase. Gather time (Megatron shards → full HF
tensors) is measured by the caller and passed in; it is reported, not measured here.

Memory: with ``metas`` (from :func:`oapl_megatron.models.hf_io.gather_hf_weights`) the sender streams — it packs
each tensor as the trainer's gather yields it and holds the tensors of at most a few buckets; receivers hold one
model copy (host memory by default on a GPU) plus K buckets on the GPU. See :func:`receive_weights`.

Why checksums travel on the data plane after the buckets: the sender streams tensors as the trainer gathers them,
so it knows a bucket's checksum only after packing it; sending them up front would need a second full packed copy.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout, wait as wait_futures
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch

from oapl_megatron.weight_sync.bucket import (BucketPacker, BucketPlan, TensorMeta, _copy_bytes, checksum,
                                              flat_nbytes, flat_offsets, plan_buckets, views_from_flat)
from oapl_megatron.weight_sync.transport import TransportError, WeightReceiver, WeightSender

SYNC_PROTOCOL = 1


class SyncError(RuntimeError):
    """A weight sync failed. ``engine_id`` is None when the failure is not attributable to one engine."""

    def __init__(self, message: str, engine_id: int | None, phase: str):
        super().__init__(message)
        self.engine_id = engine_id
        self.phase = phase


class IntegrityError(RuntimeError):
    """A receiver's checksum of one or more buckets differs from the sender's."""


@dataclass(frozen=True)
class SyncMeta:
    """Everything a receiver needs to derive the bucket plan and check it: sent over the control plane."""

    version: int
    metas: tuple[tuple, ...]  # TensorMeta.to_wire() of every tensor, in send order
    bucket_bytes: int
    checksum_algo: str | None  # None: no verification
    protocol: int = SYNC_PROTOCOL
    # Where each receiver stages the verified model until the commit (see :func:`receive_weights`): "host" keeps
    # at most ``buckets_in_flight`` buckets on an engine's GPU (outside vLLM's memory budget) and one model copy
    # in pinned host memory; "device" stages the whole model on the GPU (no host copy, one model of GPU memory).
    # On a CPU engine both are the same.
    staging: str = "host"
    buckets_in_flight: int = 2

    def plan(self) -> BucketPlan:
        if self.protocol != SYNC_PROTOCOL:
            raise ValueError(f"weight-sync metadata protocol {self.protocol}, this receiver speaks {SYNC_PROTOCOL}")
        return _cached_plan(tuple(TensorMeta.from_wire(m) for m in self.metas), self.bucket_bytes)


@functools.lru_cache(maxsize=4)
def _cached_plan(metas: tuple[TensorMeta, ...], bucket_bytes: int) -> BucketPlan:
    # every sync of a run has the same tensors: the plan (a few ms of Python for a few hundred tensors, paid on
    # every engine worker before it can post its receives) is derived once
    return plan_buckets(metas, bucket_bytes)


@dataclass
class SendStats:
    pack_s: float = 0.0  # packing + checksumming on the sender (overlaps the wire)
    broadcast_s: float = 0.0  # first post → last completion
    n_buckets: int = 0
    wire_bytes: int = 0
    zero_copy_buckets: int = 0  # sent straight from the source tensor's memory (no packing copy)


def _single_slice_view(bucket, held: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The bucket's bytes as a view of its source tensor when the bucket is one slice of one contiguous tensor
    (the middle and tail of a tensor larger than the bucket): sent without a packing copy. Otherwise None."""
    if len(bucket.slices) != 1 or bucket.slices[0].dst_offset != 0:
        return None
    s = bucket.slices[0]
    t = held[s.name]
    if not t.is_contiguous() or t.device != device or s.nbytes == 0:
        return None
    return t.detach().reshape(-1).view(torch.uint8)[s.src_start:s.src_start + s.nbytes]


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= (1 << 63) else x


def send_weights(sender: WeightSender, plan: BucketPlan, tensors: Iterable[tuple[str, torch.Tensor]],
                 checksum_algo: str | None, corrupt_bucket: int | None = None) -> SendStats:
    """Rank 0: pack ``tensors`` (yielded in plan order) into the plan's buckets and broadcast them.

    A bucket that is one slice of one contiguous tensor (the middle of an embedding larger than the bucket) is
    broadcast from the tensor's own memory, without a packing copy; the tensors must not change until this returns.

    Contract: every receiver calls :func:`receive_weights` with the same plan at the same time. ``corrupt_bucket``
    is a test hook: flip the first byte of that bucket *after* its checksum was taken (in a packed copy, never in
    the caller's tensor).
    """
    stats = SendStats(n_buckets=len(plan.buckets), wire_bytes=plan.wire_bytes)
    packer = BucketPacker(plan)
    size = max((b.nbytes for b in plan.buckets), default=0)
    bufs = sender.bucket_buffers(size, 2)
    pending: list = [None, None]
    sums: list[int] = []
    it: Iterator = iter(tensors)
    order = iter(plan.metas)
    held: dict[str, torch.Tensor] = {}  # tensors with slices still to pack
    t_start = time.perf_counter()
    for b in plan.buckets:
        for s in b.slices:
            while s.name not in held:
                try:
                    name, t = next(it)
                except StopIteration:
                    raise ValueError(f"the weight stream ended before tensor {s.name!r} of the plan") from None
                expected = next(order).name
                if name != expected:
                    raise ValueError(f"the weight stream yielded {name!r} where the plan expects {expected!r} "
                                     f"(tensors must come in the order of the metadata)")
                packer.check(name, t)
                held[name] = t
        slot = b.index % 2
        if pending[slot] is not None:
            pending[slot].wait()  # the buffer is reused: its previous broadcast must be done
        t0 = time.perf_counter()
        buf = _single_slice_view(b, held, sender.group.device) if corrupt_bucket != b.index else None
        if buf is None:
            buf = packer.pack(b, held, out=bufs[slot])
        else:
            stats.zero_copy_buckets += 1
        if checksum_algo is not None:
            sums.append(checksum(buf, checksum_algo))
        if corrupt_bucket == b.index:
            buf[0] ^= 0xFF
        stats.pack_s += time.perf_counter() - t0
        pending[slot] = sender.send(buf, f"bucket {b.index}/{len(plan.buckets)}")
        for s in b.slices:
            if s.last:
                del held[s.name]
    for p in pending:
        if p is not None:
            p.wait()
    if checksum_algo is not None:
        sums_t = torch.tensor([_signed64(x) for x in sums], dtype=torch.int64).view(torch.uint8)
        sender.send(sums_t.to(sender.group.device), "checksums").wait()
    extra = next(it, None)
    if extra is not None:  # raised after the last broadcast so that the receivers are not left waiting
        raise ValueError(f"the weight stream yielded {extra[0]!r} after the last tensor of the plan")
    stats.broadcast_s = time.perf_counter() - t_start
    return stats


@dataclass
class ReceiveStats:
    receive_s: float = 0.0  # first post → last bucket in (checksumming overlaps the transfer)
    verify_s: float = 0.0  # checksumming received buckets
    bytes: int = 0
    device_buffers: int = 0  # bucket buffers allocated on the group's device (bounded mode); 0 in direct mode


def receive_weights(receiver: WeightReceiver, meta: SyncMeta, staging_device: torch.device | str | None = None,
                    buckets_in_flight: int | None = None) -> tuple[list[tuple[str, torch.Tensor]], ReceiveStats]:
    """Ranks ≥ 1: receive every bucket of ``meta``'s plan and verify it; returns staged ``(name, tensor)`` pairs.

    The whole model is staged (nothing is loaded before every engine verified every bucket: all-or-nothing), in
    one flat buffer laid out by :func:`~oapl_megatron.weight_sync.bucket.flat_offsets`; the returned tensors are
    zero-copy views of it. Where it lives, and what the group's device holds meanwhile:

    * **direct** (``staging_device`` is the group's device and ``buckets_in_flight`` is None; the default on a CPU
      / gloo group): every bucket is received straight into its slot, all receives posted at once. Memory on the
      group's device: one model.
    * **bounded** (``staging_device`` differs from the group's device, e.g. host staging of an NCCL group, or
      ``buckets_in_flight`` given): at most ``buckets_in_flight`` (default 2) bucket buffers on the group's device;
      each bucket is checksummed there and copied into the staging buffer (pinned host memory for a CUDA group)
      before its buffer takes the next bucket. Memory on the group's device: K x bucket size, whatever the model
      size; the staging device holds one model.

    Raises :class:`IntegrityError` naming every bucket whose checksum differs (after all buckets were received,
    so the group stays in step), or :class:`~oapl_megatron.weight_sync.transport.TransportError` when the sender
    fails or times out.
    """
    plan = meta.plan()
    group_device = receiver.group.device
    staging_device = group_device if staging_device is None else torch.device(staging_device)
    bounded = staging_device != group_device or buckets_in_flight is not None
    stats = ReceiveStats(bytes=plan.wire_bytes)
    n = len(plan.buckets)
    t_start = time.perf_counter()
    flat = receiver.staging_buffer(flat_nbytes(plan), staging_device)
    slots = [flat[off:off + b.nbytes] for off, b in zip(flat_offsets(plan), plan.buckets)]
    sums: list[int] = []

    def verify(buf: torch.Tensor) -> None:
        if meta.checksum_algo is not None:  # overlaps the buckets still on the wire
            t0 = time.perf_counter()
            sums.append(checksum(buf, meta.checksum_algo))
            stats.verify_s += time.perf_counter() - t0

    if not bounded:
        pending = [receiver.recv_into(slot, f"bucket {b.index}/{n}") for slot, b in zip(slots, plan.buckets)]
        for b, p in zip(plan.buckets, pending):
            p.wait()
            verify(slots[b.index])
    else:
        k = max(1, buckets_in_flight or 2)
        size = max((b.nbytes for b in plan.buckets), default=0)
        bufs = [receiver.alloc(size) for _ in range(min(k, n))]
        stats.device_buffers = len(bufs)
        pending = {}
        for b in plan.buckets[:len(bufs)]:
            pending[b.index] = receiver.recv_into(bufs[b.index % len(bufs)][:b.nbytes], f"bucket {b.index}/{n}")
        for b in plan.buckets:
            buf = bufs[b.index % len(bufs)][:b.nbytes]
            pending.pop(b.index).wait()
            verify(buf)  # on the group's device: wsum64 on a GPU needs no device→host copy of the data
            _copy_bytes(slots[b.index], buf)  # synchronous: the buffer is free for the next bucket afterwards
            nxt = b.index + len(bufs)
            if nxt < n:
                nb = plan.buckets[nxt]
                pending[nxt] = receiver.recv_into(bufs[nxt % len(bufs)][:nb.nbytes], f"bucket {nxt}/{n}")
    stats.receive_s = time.perf_counter() - t_start
    if meta.checksum_algo is not None:
        sent = receiver.alloc(8 * n)
        receiver.recv_into(sent, "checksums").wait()
        sent_sums = [x % (1 << 64) for x in sent.cpu().view(torch.int64).tolist()]
        bad = [i for i, (a, b) in enumerate(zip(sums, sent_sums)) if a != b]
        if bad:
            raise IntegrityError(f"checksum mismatch ({meta.checksum_algo}) in bucket(s) {bad} of {n} "
                                 f"(version {meta.version}); nothing was loaded")
    return views_from_flat(plan, flat), stats


# ----------------------------------------------------------------------------------------------- orchestration


class SyncTarget(Protocol):
    """One engine as the sync sees it (implemented by the engine client)."""

    engine_id: int

    def describe(self) -> str: ...  # "engine 1 (pid 123)" / "engine 1 (host:port)"

    def alive(self) -> bool: ...

    # Each returns a Future whose own wait is bounded by ``timeout_s``.
    def begin_receive(self, meta: SyncMeta, timeout_s: float) -> Future: ...  # → the engine's receive stats

    def commit(self, version: int, timeout_s: float) -> Future: ...  # load staged, reset prefix cache, take version

    def abort(self, timeout_s: float) -> Future: ...  # drop staged weights


@dataclass
class SyncReport:
    """Times (s) and sizes of one sync; ``engines`` holds each engine's own receive/verify/load times."""

    version: int
    n_tensors: int
    n_buckets: int
    bucket_bytes: int
    payload_bytes: int
    wire_bytes: int
    gather_s: float
    pack_s: float
    broadcast_s: float
    verify_s: float  # slowest engine
    load_s: float  # slowest engine (in-place load + prefix-cache reset)
    total_s: float
    engines: dict = field(default_factory=dict)


@dataclass
class SyncHooks:
    """Test hooks; all None in production."""

    after_meta: Callable[[Sequence[SyncTarget]], None] | None = None
    corrupt_bucket: int | None = None


def _wait(fut: Future, target: SyncTarget, phase: str, timeout_s: float):
    try:
        return fut.result(timeout=timeout_s)
    except FutureTimeout:
        raise SyncError(f"{target.describe()}: no reply in phase '{phase}' within {timeout_s:.0f}s "
                        f"(alive={target.alive()})", target.engine_id, phase) from None
    except SyncError:
        raise
    except Exception as e:
        raise SyncError(f"{target.describe()}: phase '{phase}' failed: {e}", target.engine_id, phase) from e


def run_sync(sender: WeightSender, targets: Sequence[SyncTarget], named_tensors: Iterable[tuple[str, torch.Tensor]],
             version: int, bucket_bytes: int, verify: bool, timeout_s: float, gather_s: float = 0.0,
             metas: Sequence[TensorMeta] | None = None, hooks: SyncHooks | None = None,
             staging: str = "host", buckets_in_flight: int = 2) -> SyncReport:
    """Trainer side of one sync (rank 0 of the weight group). See the module docstring for the phases.

    ``metas`` (names/dtypes/shapes in stream order) lets the caller stream ``named_tensors`` lazily; without it the
    stream is materialized once to derive them. On return every engine serves ``version``. On :class:`SyncError`
    in phase ``verify`` every engine still serves its previous version and the group is usable; after a failure in
    ``pack`` or ``broadcast`` (bad tensor stream, a peer died or timed out) engines still serve their previous
    version but the data-plane group is out of step and must be rebuilt.
    """
    hooks = hooks or SyncHooks()
    t_total = time.perf_counter()
    if metas is None:
        named_tensors = list(named_tensors)
        metas = [TensorMeta.of(n, t) for n, t in named_tensors]
    plan = _cached_plan(tuple(metas), bucket_bytes)
    algo = sender.checksum_algo if verify else None
    if staging not in ("host", "device") or buckets_in_flight < 1:
        raise ValueError(f"staging={staging!r} (host|device), buckets_in_flight={buckets_in_flight} (>= 1)")
    meta = SyncMeta(version=version, metas=tuple(m.to_wire() for m in plan.metas), bucket_bytes=bucket_bytes,
                    checksum_algo=algo, staging=staging, buckets_in_flight=buckets_in_flight)
    # The engines need slack beyond the per-op timeout: they also unpack, checksum and (later) load.
    reply_timeout = timeout_s + 30.0

    # phase meta: each engine starts receiving; its reply arrives after it has verified everything.
    receives: list[tuple[SyncTarget, Future]] = []
    for t in targets:
        if not t.alive():
            raise SyncError(f"{t.describe()} is not running (phase 'meta')", t.engine_id, "meta")
        receives.append((t, t.begin_receive(meta, reply_timeout)))
    if hooks.after_meta is not None:
        hooks.after_meta(targets)

    # phase broadcast
    try:
        stats = send_weights(sender, plan, named_tensors, algo, corrupt_bucket=hooks.corrupt_bucket)
    except TransportError as e:
        raise _attribute_failure(receives, "broadcast", e) from e
    except ValueError as e:  # the trainer's tensor stream disagrees with its metadata; receivers may be mid-sync
        raise SyncError(f"phase 'pack': {e}; the receivers did not get a complete sync", None, "pack") from e

    # phase verify: all engines must report a clean receive before any of them loads.
    engines: dict[int, dict] = {}
    failures: list[SyncError] = []
    for t, fut in receives:
        try:
            engines[t.engine_id] = dict(_wait(fut, t, "verify", reply_timeout))
        except SyncError as e:
            failures.append(e)
    if failures:
        for t, _ in receives:
            if t.alive():
                try:
                    _wait(t.abort(reply_timeout), t, "abort", reply_timeout)
                except SyncError:
                    pass  # already failing; the first error is the one to report
        first = failures[0]
        others = "; ".join(str(f) for f in failures[1:])
        raise SyncError(str(first) + (f" (also: {others})" if others else "") +
                        f"; all engines keep their previous weights", first.engine_id, "verify")

    # phase load
    commits = [(t, t.commit(version, reply_timeout)) for t in targets]
    for t, fut in commits:
        engines[t.engine_id].update(_wait(fut, t, "load", reply_timeout))

    return SyncReport(
        version=version, n_tensors=len(plan.metas), n_buckets=len(plan.buckets), bucket_bytes=bucket_bytes,
        payload_bytes=plan.total_bytes, wire_bytes=plan.wire_bytes, gather_s=gather_s, pack_s=stats.pack_s,
        broadcast_s=stats.broadcast_s,
        verify_s=max((e.get("verify_s", 0.0) for e in engines.values()), default=0.0),
        load_s=max((e.get("load_s", 0.0) for e in engines.values()), default=0.0),
        total_s=time.perf_counter() - t_total + gather_s, engines=engines)


def _attribute_failure(receives: list[tuple[SyncTarget, Future]], phase: str, cause: Exception) -> SyncError:
    """Name the engine behind a data-plane failure: a dead engine first, else one whose receive already failed."""
    # The engines' replies (e.g. a lost connection) may trail the sender's own error by a moment.
    wait_futures([f for _, f in receives], timeout=5.0)
    for t, _ in receives:
        if not t.alive():
            return SyncError(f"{t.describe()} died during phase '{phase}': {cause}", t.engine_id, phase)
    for t, fut in receives:
        if fut.done() and fut.exception() is not None:
            return SyncError(f"{t.describe()} failed during phase '{phase}': {fut.exception()}", t.engine_id, phase)
    names = ", ".join(t.describe() for t, _ in receives)
    return SyncError(f"phase '{phase}' failed (engines: {names}): {cause}", None, phase)
