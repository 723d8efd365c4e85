"""Per-token log-probabilities and entropy from vocab-parallel logits (the last pipeline stage computes them).

The logits of one TP rank cover the vocabulary slice ``[vocab_start, vocab_start + V_local)``; rows past the real
vocabulary (padding added so the vocabulary divides by TP) are masked out so the softmax equals the unpadded
model's.

Memory: the logits are the largest activation of the model (16K tokens x 152K vocabulary is 5 GB in bf16, 10 GB in
fp32). :func:`token_logprobs_and_entropy` never builds a full-vocabulary fp32 copy, a softmax or an ``exp`` for all
tokens at once: it walks the tokens in chunks of ``chunk_bytes`` of fp32 (at most two such chunks live at once),
keeps one float per token for the backward pass (the log-sum-exp), and recomputes the softmax chunk by chunk
there. Extra memory is O(chunk) beyond the logits' gradient (which autograd needs anyway) instead of ~7 full
fp32 copies (cast, padding mask, clone, exp, and the entropy's shifted/exp/product tensors); measured with
tools/bench_logprobs.py (docs/benchmarks.md). The numbers are those of the full formula (the tests check against
it and a float64 reference).

Log-probs carry gradients (the gradient of log p(target) w.r.t. this rank's logits is ``onehot - softmax``, local
to the rank: the output layer's backward all-reduces over TP, as with megatron's vocab-parallel cross entropy).
The entropy is a metric and has no gradient.

Collectives: per chunk, one MAX and one SUM all-reduce over ``tp_group`` when it has more than one rank (every TP
rank of the stage calls this with the same shapes). No megatron import.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BYTES = 128 * 2**20  # one fp32 chunk: ~220 tokens at a 152K vocabulary, TP=1 (two are live at once)


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """Set logits of padded vocabulary rows to a large negative value. logits: [..., V_local] (float32)."""
    v_local = logits.size(-1)
    n_real = vocab_size - vocab_start
    if n_real >= v_local:
        return logits
    neg = torch.finfo(logits.dtype).min / 4  # exp() underflows to 0; p*z stays finite (0 * big = 0)
    keep = torch.arange(v_local, device=logits.device) < n_real
    return logits.masked_fill(~keep, neg)


def _tp_size(tp_group) -> int:
    return dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1


def _chunk_rows(v_local: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * max(v_local, 1)))


def _fp32_chunk(logits: torch.Tensor, a: int, b: int, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """Rows ``a:b`` of the logits as a fresh fp32 tensor (ours to modify in place), padding rows masked."""
    x = logits[a:b].to(torch.float32, copy=True)  # [r, V_local]
    n_real = vocab_size - vocab_start
    if n_real < x.size(-1):
        x[:, max(n_real, 0):] = torch.finfo(torch.float32).min / 4
    return x


class _VocabParallelLogprob(torch.autograd.Function):
    """log p(target) and entropy per row of [N, V_local] logits, chunked over rows (see the module docstring).

    Per chunk the fp32 work is two [rows, V_local] tensors (the shifted logits and their exp), updated in place."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_size: int, vocab_start: int, tp_group, chunk_bytes: int):
        n, v_local = logits.shape
        rows = _chunk_rows(v_local, chunk_bytes)
        tp = _tp_size(tp_group)
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logp)
        lse = torch.empty_like(logp)  # log Σ_v exp(x_v) over the full vocabulary, kept for the backward pass
        for a in range(0, n, rows):
            b = min(n, a + rows)
            z = _fp32_chunk(logits, a, b, vocab_size, vocab_start)  # [r, V_local]
            m = z.max(dim=-1).values  # [r]
            if tp > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
            z -= m.unsqueeze(-1)  # z = x - max
            t = targets[a:b] - vocab_start
            local = (t >= 0) & (t < v_local)
            z_t = torch.where(local, z.gather(-1, t.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1),
                              torch.zeros((), dtype=z.dtype, device=z.device))  # [r], 0 on other ranks
            ez = torch.exp(z)
            sum_ez = ez.sum(dim=-1)
            sum_ez_z = z.mul_(ez).sum(dim=-1)  # z is not needed after this
            del ez, z
            sums = torch.stack([sum_ez, sum_ez_z, z_t])  # [3, r]
            if tp > 1:
                dist.all_reduce(sums, group=tp_group)
            sum_ez, sum_ez_z, z_t = sums[0], sums[1], sums[2]
            log_z = torch.log(sum_ez)
            logp[a:b] = z_t - log_z
            # H = log Z - E_p[z] with z shifted by the max: log Z = log Σ e^z, E_p[z] = Σ e^z z / Σ e^z
            entropy[a:b] = log_z - sum_ez_z / sum_ez
            lse[a:b] = m + log_z
        ctx.save_for_backward(logits, targets, lse)
        ctx.meta = (vocab_size, vocab_start, rows)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        logits, targets, lse = ctx.saved_tensors
        vocab_size, vocab_start, rows = ctx.meta
        n, v_local = logits.shape
        grad = torch.empty_like(logits)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            p = _fp32_chunk(logits, a, b, vocab_size, vocab_start)
            p.sub_(lse[a:b, None]).exp_()  # softmax over the full vocabulary, this rank's slice
            g = grad_logp[a:b].float()
            p.mul_(-g.unsqueeze(-1))  # d log p(t) / dx_v = 1[v = t] - p_v
            t = targets[a:b] - vocab_start
            local = (t >= 0) & (t < v_local)
            idx = t.clamp(0, v_local - 1).unsqueeze(-1)
            p.scatter_add_(-1, idx, torch.where(local, g, torch.zeros_like(g)).unsqueeze(-1))
            grad[a:b] = p  # cast to the logits' dtype
        return grad, None, None, None, None, None


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, vocab_start: int,
                               tp_group=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target), entropy)`` per position of vocab-parallel logits, chunked over tokens.

    logits: [B, S, V_local] (any float dtype; computed in fp32); targets: [B, S] global token ids → two [B, S]
    fp32 tensors. The log-probs are differentiable w.r.t. ``logits``; the entropy is not. ``vocab_start``: the
    first vocabulary row of this rank's slice; ``vocab_size``: the real (unpadded) vocabulary.
    """
    bsz, seq, v_local = logits.shape
    logp, entropy = _VocabParallelLogprob.apply(logits.reshape(bsz * seq, v_local), targets.reshape(-1),
                                                vocab_size, vocab_start, tp_group, chunk_bytes)
    return logp.view(bsz, seq), entropy.view(bsz, seq)
