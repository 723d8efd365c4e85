"""Chunked vocab-parallel log-probs and entropy (oapl_megatron.trainer.logprobs) against a float64 reference and
megatron's vocab-parallel cross entropy (the formula used before chunking), at TP=1 in process and TP=2 on two
spawned gloo ranks. Values and gradients; padding rows of the last TP rank masked out."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from dist_util import free_port  # noqa: E402
from oapl_megatron.trainer.logprobs import mask_vocab_padding, token_logprobs_and_entropy

VOCAB, PADDED = 37, 40  # 3 padding rows, so TP=2 slices are [0, 20) and [20, 40) with padding on rank 1


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 9, PADDED, generator=g)).to(dtype)
    targets = torch.randint(0, VOCAB, (2, 9), generator=g)
    weights = torch.randn(2, 9, generator=g)  # a loss Σ w · logp, so the gradient is not all ones
    return logits, targets, weights


def _reference(logits, targets, weights):
    """float64, full vocabulary, autograd: log-probs, entropy, d(Σ w logp)/d logits."""
    x = logits.detach().double().requires_grad_(True)
    lp_all = torch.log_softmax(x[..., :VOCAB], dim=-1)
    logp = lp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(lp_all.exp() * lp_all).sum(-1)
    (logp * weights.double()).sum().backward()
    return logp.detach(), entropy.detach(), x.grad


def _megatron_formula(logits, targets):
    """The pre-chunking formula: mask, clone, megatron's vocab-parallel cross entropy (TP=1 here)."""
    from megatron.core import tensor_parallel

    from oapl_megatron.config.schema import ParallelConfig
    from oapl_megatron.parallel.bootstrap import init_distributed, shutdown

    init_distributed(ParallelConfig(), seed=0)
    try:
        x = mask_vocab_padding(logits.float(), VOCAB, 0)
        return -tensor_parallel.vocab_parallel_cross_entropy(x.clone(), targets)
    finally:
        shutdown()


@pytest.mark.parametrize("chunk_bytes", [4 * PADDED, 4 * PADDED * 5, 1 << 30])  # 1 token, 5 tokens, one chunk
def test_tp1_matches_float64_and_megatron(chunk_bytes):
    logits, targets, weights = _data()
    ref_lp, ref_h, ref_grad = _reference(logits, targets, weights)
    x = logits.clone().requires_grad_(True)
    logp, entropy = token_logprobs_and_entropy(x, targets, VOCAB, 0, None, chunk_bytes=chunk_bytes)
    (logp * weights).sum().backward()
    assert (logp.double() - ref_lp).abs().max() < 1e-5
    assert (entropy.double() - ref_h).abs().max() < 1e-5
    assert (x.grad.double() - ref_grad).abs().max() < 1e-6
    assert not entropy.requires_grad
    assert torch.equal(x.detach(), logits)  # the input is not modified (megatron's CE overwrites fp32 logits)
    if chunk_bytes == 4 * PADDED * 5:
        old = _megatron_formula(logits, targets)
        assert (logp - old).abs().max() < 1e-5


def test_bf16_logits_give_fp32_results_and_bf16_grads():
    logits, targets, weights = _data(torch.bfloat16)
    ref_lp, ref_h, _ = _reference(logits, targets, weights)
    x = logits.clone().requires_grad_(True)
    logp, entropy = token_logprobs_and_entropy(x, targets, VOCAB, 0, chunk_bytes=4 * PADDED * 3)
    (logp * weights).sum().backward()
    assert logp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert (logp.double() - ref_lp).abs().max() < 1e-5  # computed in fp32 from the bf16 values
    assert (entropy.double() - ref_h).abs().max() < 1e-5


def _tp2_rank(rank: int, port: int, q) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        logits, targets, weights = _data()
        half = PADDED // 2
        x = logits[..., rank * half:(rank + 1) * half].clone().requires_grad_(True)
        logp, entropy = token_logprobs_and_entropy(x, targets, VOCAB, rank * half, dist.group.WORLD,
                                                   chunk_bytes=4 * half * 4)
        (logp * weights).sum().backward()
        # numpy arrays pickle by value; torch tensors on a multiprocessing queue travel as file descriptors that a
        # rank which has already exited can no longer hand over (FileNotFoundError in the parent, seen in CI)
        q.put((rank, logp.detach().numpy(), entropy.numpy(), x.grad.numpy()))
    finally:
        dist.destroy_process_group()


def test_tp2_matches_float64():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_tp2_rank, args=(r, port, q)) for r in (0, 1)]
    for p_ in procs:
        p_.start()
    got = {r: [torch.from_numpy(a) for a in rest] for r, *rest in (q.get(timeout=120) for _ in procs)}
    for p_ in procs:
        p_.join(timeout=30)
        assert p_.exitcode == 0
    logits, targets, weights = _data()
    ref_lp, ref_h, ref_grad = _reference(logits, targets, weights)
    for r in (0, 1):
        logp, entropy, grad = got[r]
        assert (logp.double() - ref_lp).abs().max() < 1e-5, r
        assert (entropy.double() - ref_h).abs().max() < 1e-5, r
    full_grad = torch.cat([got[0][2], got[1][2]], dim=-1)
    assert (full_grad[..., :VOCAB].double() - ref_grad[..., :VOCAB]).abs().max() < 1e-6
    assert full_grad[..., VOCAB:].abs().max() == 0  # padding rows get no gradient
