"""Pure packing plan: round trips for mixed dtypes/shapes, identical boundaries on both sides, checksums."""

import pytest
import torch

from oapl_megatron.weight_sync.bucket import (ALIGN_BYTES, BucketPacker, TensorMeta, checksum,
                                              flat_nbytes, flat_offsets, plan_buckets, views_from_flat)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(37, 11, generator=g)),  # fp32, odd size
        ("b.bias", torch.randn(5, generator=g).to(torch.bfloat16)),
        ("c.big", torch.randn(300, 17, generator=g, dtype=torch.float64)),  # larger than one bucket
        ("d.ids", torch.randint(-5, 5, (3, 3, 3), generator=g)),  # int64
        ("e.empty", torch.empty(0, 4)),  # zero-size
        ("f.half", torch.randn(129, generator=g).half()),
        ("g.mask", torch.rand(17, generator=g) > 0.5),  # bool
        ("h.scalar", torch.tensor(3.5)),
        ("i.noncontig", torch.randn(8, 6, generator=g).t()),  # transposed view
    ]


@pytest.mark.parametrize("bucket_bytes", [ALIGN_BYTES, 1024, 4096, 1 << 20])
def test_round_trip_and_identical_boundaries(bucket_bytes):
    tensors = _tensors()
    metas = [TensorMeta.of(n, t) for n, t in tensors]
    sender_plan = plan_buckets(metas, bucket_bytes)
    # the receiver only sees the wire form of the metadata
    receiver_plan = plan_buckets([TensorMeta.from_wire(m.to_wire()) for m in metas], bucket_bytes)
    assert sender_plan.buckets == receiver_plan.buckets
    assert all(b.nbytes <= bucket_bytes for b in sender_plan.buckets)
    # every bucket but the last is full when tensors are split (fixed-size buckets)
    if bucket_bytes <= 1024:
        assert all(b.nbytes > bucket_bytes - ALIGN_BYTES for b in sender_plan.buckets[:-1])
    assert sender_plan.total_bytes == sum(t.numel() * t.element_size() for _, t in tensors)

    packer = BucketPacker(sender_plan)
    by_name = dict(tensors)
    buf = torch.empty(bucket_bytes, dtype=torch.uint8)
    flat = torch.full((flat_nbytes(receiver_plan),), 0xCD, dtype=torch.uint8)  # the receiver's staging buffer
    for off, b in zip(flat_offsets(receiver_plan), sender_plan.buckets):
        packed = packer.pack(b, by_name, out=buf)
        flat[off:off + b.nbytes] = packed  # what a bounded receiver does with each bucket it received
        buf.fill_(0xAB)  # the sender reuses its buffer
    got = views_from_flat(receiver_plan, flat)
    assert [n for n, _ in got] == [n for n, _ in tensors]
    for (name, want), (_, have) in zip(tensors, got):
        assert have.dtype == want.dtype and have.shape == want.shape, name
        assert torch.equal(have, want), name


def test_plan_is_deterministic_and_splits_large_tensors():
    metas = [TensorMeta("x", "float32", (1000,)), TensorMeta("y", "float32", (10,))]
    p = plan_buckets(metas, 1024)
    assert p == plan_buckets(metas, 1024)
    x_slices = [s for b in p.buckets for s in b.slices if s.name == "x"]
    assert sum(s.nbytes for s in x_slices) == 4000 and x_slices[-1].last and not x_slices[0].last
    # y starts at an aligned offset
    y = [s for b in p.buckets for s in b.slices if s.name == "y"][0]
    assert y.dst_offset % ALIGN_BYTES == 0


def test_bad_inputs_name_the_tensor():
    metas = [TensorMeta("x", "float32", (4,))]
    plan = plan_buckets(metas, 1024)
    with pytest.raises(ValueError, match="'x' is float16"):
        BucketPacker(plan).check("x", torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="appears twice"):
        plan_buckets(metas + metas, 1024)
    with pytest.raises(ValueError, match="multiple of"):
        plan_buckets(metas, 1000)
    with pytest.raises(ValueError, match="unknown dtype"):
        plan_buckets([TensorMeta("z", "complex64", (2,))], 1024)


@pytest.mark.parametrize("algo", ["crc32", "wsum64"])
def test_checksum_detects_flips_and_swaps(algo):
    buf = torch.randint(0, 256, (4093,), dtype=torch.uint8)
    c = checksum(buf, algo)
    assert c == checksum(buf.clone(), algo)
    flipped = buf.clone()
    flipped[100] ^= 0x01
    assert checksum(flipped, algo) != c
    swapped = buf.clone()
    swapped[0:8], swapped[8:16] = buf[8:16].clone(), buf[0:8].clone()
    if not torch.equal(swapped, buf):
        assert checksum(swapped, algo) != c
    # a view that does not start at an 8-byte boundary
    assert checksum(buf[3:], algo) == checksum(buf[3:].clone(), algo)


@pytest.mark.parametrize("bucket_bytes", [ALIGN_BYTES, 1024, 1 << 20])
def test_flat_layout_gives_zero_copy_views(bucket_bytes):
    """Buckets laid back to back at k * bucket_bytes hold every tensor contiguously (what receivers rely on)."""
    tensors = _tensors()
    plan = plan_buckets([TensorMeta.of(n, t) for n, t in tensors], bucket_bytes)
    flat = torch.full((flat_nbytes(plan),), 0xCD, dtype=torch.uint8)
    packer = BucketPacker(plan)
    for off, b in zip(flat_offsets(plan), plan.buckets):
        packer.pack(b, dict(tensors), out=flat[off:off + b.nbytes])
    views = views_from_flat(plan, flat)
    assert [n for n, _ in views] == [n for n, _ in tensors]
    for (name, want), (_, have) in zip(tensors, views):
        assert have.dtype == want.dtype and torch.equal(have, want), name
        if want.numel():
            assert have.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()  # a view, no copy
