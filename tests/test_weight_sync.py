"""Data plane of weight sync with real processes: one sender (this process) and receiver processes on a gloo group.

Source tensors are a transformers Qwen3 model's ``state_dict()`` (tied embeddings, so ``lm_head.weight`` is in it)
plus bf16/int extras. The engine-level tests (vLLM) are in ``test_engine.py``.
"""

import multiprocessing as mp
import time
import traceback
import weakref

import pytest
import torch

from oapl_megatron.weight_sync.bucket import TensorMeta, plan_buckets
from oapl_megatron.weight_sync.sync import IntegrityError, SyncMeta, receive_weights, send_weights
from oapl_megatron.weight_sync.transport import (TransportError, WeightGroup, make_receiver, make_sender,
                                                 open_rendezvous, resolve_backend)


def _source():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)
    items = list(Qwen3ForCausalLM(cfg).state_dict().items())
    assert any(n == "lm_head.weight" for n, _ in items)
    items.append(("extra.bf16", torch.randn(33, 7).to(torch.bfloat16)))
    items.append(("extra.int", torch.arange(10)))
    return items


def _to_wire(t):
    # plain bytes: torch tensors on a multiprocessing queue go through shared memory that dies with the receiver
    t = t.detach().cpu().contiguous()
    return str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _equal(want, wire):
    dtype, shape, data = wire
    t = want.detach().cpu().contiguous()
    return dtype == str(t.dtype) and shape == tuple(t.shape) and data == t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _receiver(port, rank, world, meta, timeout_s, die, q, in_flight=None):
    torch.set_num_threads(1)
    try:
        group = WeightGroup.join("127.0.0.1", port, rank, world, "gloo", timeout_s)
        if die:
            import os
            os._exit(3)  # a receiver that vanishes after joining
        staged, stats = receive_weights(make_receiver(group), meta, buckets_in_flight=in_flight)
        q.put((rank, "ok", [(n, _to_wire(t)) for n, t in staged] + [("device_buffers", stats.device_buffers)]))
    except IntegrityError as e:
        q.put((rank, "integrity", str(e)))
    except Exception as e:
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class _LiveCounter:
    """Yields clones of ``items`` and records the most clones alive at once (what the sender holds)."""

    def __init__(self, items):
        self.items, self.live, self.max_live = items, 0, 0

    def _gone(self):
        self.live -= 1

    def __iter__(self):
        for n, t in self.items:
            c = t.clone()
            self.live += 1
            weakref.finalize(c, self._gone)
            self.max_live = max(self.max_live, self.live)
            yield n, c
            del c


def _run(n_receivers, bucket_bytes, corrupt=None, die_rank=None, timeout_s=30.0, in_flight=None, stream=None):
    items = _source()
    metas = [TensorMeta.of(n, t) for n, t in items]
    plan = plan_buckets(metas, bucket_bytes)
    meta = SyncMeta(version=1, metas=tuple(m.to_wire() for m in metas), bucket_bytes=bucket_bytes,
                    checksum_algo="crc32")
    world = 1 + n_receivers
    store = open_rendezvous("127.0.0.1", 0, world, timeout_s)
    # fork: receivers need no fresh imports (spawned children take 5-30 s to import torch on a loaded 2-core box)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(store.port, r, world, meta, timeout_s, r == die_rank, q, in_flight))
             for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        group = WeightGroup.join("127.0.0.1", store.port, 0, world, "gloo", timeout_s, store=store)
        err = stats = None
        try:
            source = stream if stream is not None else iter(items)
            stats = send_weights(make_sender(group), plan, source, "crc32", corrupt_bucket=corrupt)
        except TransportError as e:
            err = e
        results = {}
        for _ in range(n_receivers - (1 if die_rank else 0)):
            rank, kind, payload = q.get(timeout=timeout_s + 30)
            results[rank] = (kind, payload)
        return items, plan, results, err, stats
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


@pytest.mark.parametrize("in_flight", [None, 2])
def test_round_trip_two_receivers_many_buckets(in_flight):
    """Direct receive (every bucket into its staging slot) and bounded receive (2 bucket buffers on the group's
    device, each copied into the staging buffer after its checksum). The sender streams: it holds a few of the
    yielded tensors at a time, not the model."""
    counter = _LiveCounter(_source())
    items, plan, results, err, stats = _run(2, bucket_bytes=4096, in_flight=in_flight, stream=iter(counter))
    assert err is None
    # the tensors of the bucket being packed and of the two buckets on the wire (zero-copy views keep theirs)
    assert counter.max_live <= 4 < len(items) / 4, (counter.max_live, len(items))
    assert len(plan.buckets) > 20  # small buckets: tensors are split across many of them
    # buckets that hold one slice of one tensor (the embedding's middle) go out without a packing copy
    single = [b for b in plan.buckets if len(b.slices) == 1 and b.slices[0].dst_offset == 0]
    assert stats.zero_copy_buckets == len(single) > 10
    for rank in (1, 2):
        kind, staged = results[rank]
        assert kind == "ok", staged
        assert staged.pop() == ("device_buffers", 0 if in_flight is None else in_flight)
        assert [n for n, _ in staged] == [n for n, _ in items]
        for (n, want), (_, got) in zip(items, staged):
            assert _equal(want, got), (rank, n)


@pytest.mark.parametrize("corrupt,in_flight", [(5, None), (30, None), (30, 3)])
def test_corrupted_bucket_is_detected_on_every_receiver(corrupt, in_flight):
    # bucket 5 is a middle slice of the embedding (sent zero-copy unless corrupted), bucket 30 packs 4 tensors
    pristine = [(n, t.clone()) for n, t in _source()]
    items, plan, results, err, _ = _run(2, bucket_bytes=4096, corrupt=corrupt, in_flight=in_flight)
    assert err is None
    assert (len(plan.buckets[corrupt].slices) == 1) == (corrupt == 5)
    for rank in (1, 2):
        kind, msg = results[rank]
        assert kind == "integrity", msg
        assert f"bucket(s) [{corrupt}]" in msg and f"of {len(plan.buckets)}" in msg
    # the test hook corrupts a packed copy, never the sender's own tensors
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(items, pristine))


def test_dead_receiver_fails_the_sender_within_the_timeout():
    t0 = time.monotonic()
    _, _, results, err, _ = _run(2, bucket_bytes=4096, die_rank=2, timeout_s=10.0)
    assert isinstance(err, TransportError), err
    assert "rank 0/3" in str(err) and "bucket" in str(err)
    assert time.monotonic() - t0 < 60
    # the surviving receiver does not hang either: it errors (sender gone or peer gone) or finishes
    assert results[1][0] in ("error", "ok")


def test_nccl_is_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("nccl")
    assert resolve_backend("auto") == "gloo"


@pytest.mark.gpu
def test_nccl_round_trip_two_gpus():
    """Sender on cuda:0, receiver process on cuda:1 over NCCL, wsum64 checksums on the device.
    (NCCL refuses two ranks of one communicator on the same GPU, hence two GPUs.)"""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torch.cuda.set_device(0)
    items = [(n, t.cuda()) for n, t in _source()]
    metas = [TensorMeta.of(n, t) for n, t in items]
    plan = plan_buckets(metas, 1 << 16)
    meta = SyncMeta(version=1, metas=tuple(m.to_wire() for m in metas), bucket_bytes=1 << 16,
                    checksum_algo="wsum64")
    store = open_rendezvous("127.0.0.1", 0, 2, 60)
    ctx = mp.get_context("spawn")  # CUDA is initialized here: no fork
    q = ctx.Queue()
    p = ctx.Process(target=_nccl_receiver, args=(store.port, meta, q))
    p.start()
    try:
        group = WeightGroup.join("127.0.0.1", store.port, 0, 2, "nccl", 60, store=store)
        send_weights(make_sender(group), plan, iter(items), "wsum64")
        kind, staged = q.get(timeout=120)
        assert kind == "ok", staged
        for (n, want), (_, got) in zip(items, staged):
            assert _equal(want, got), n
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()


def _nccl_receiver(port, meta, q):
    try:
        torch.cuda.set_device(1)
        group = WeightGroup.join("127.0.0.1", port, 1, 2, "nccl", 60)
        staged, _ = receive_weights(make_receiver(group), meta, staging_device="cpu", buckets_in_flight=2)
        q.put(("ok", [(n, _to_wire(t)) for n, t in staged]))
    except Exception as e:
        q.put(("error", f"{type(e).__name__}: {e}"))


def test_sender_rejects_a_stream_that_disagrees_with_its_metadata():
    """Wrong order, wrong dtype, missing or extra tensors: errors name the tensor (a 1-member group, no peers)."""
    store = open_rendezvous("127.0.0.1", 0, 1, 10)
    group = WeightGroup.join("127.0.0.1", store.port, 0, 1, "gloo", 10, store=store)
    sender = make_sender(group)
    a, b = torch.zeros(4), torch.ones(3)
    plan = plan_buckets([TensorMeta.of("a", a), TensorMeta.of("b", b)], 1024)
    with pytest.raises(ValueError, match="yielded 'b' where the plan expects 'a'"):
        send_weights(sender, plan, [("b", b), ("a", a)], "crc32")
    with pytest.raises(ValueError, match="'b' is float16"):
        send_weights(sender, plan, [("a", a), ("b", b.half())], "crc32")
    with pytest.raises(ValueError, match="ended before tensor 'b'"):
        send_weights(sender, plan, [("a", a)], "crc32")
    with pytest.raises(ValueError, match="yielded 'c' after the last tensor"):
        send_weights(sender, plan, [("a", a), ("b", b), ("c", a)], "crc32")
    group.close()
