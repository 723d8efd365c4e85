"""Per-token log-probabilities and entropy from vocab-parallel logits (the last pipeline stage computes them).

The logits of one TP rank cover the vocabulary slice ``[vocab_start, vocab_start + V_local)``; rows past the real
vocabulary (padding added so the vocabulary divides by TP) are masked out so the softmax equals the unpadded
model's. Log-probs carry gradients (they go through megatron's vocab-parallel cross entropy, which all-reduces over
the TP group); the entropy is a metric and is computed without gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """Set logits of padded vocabulary rows to a large negative value. logits: [..., V_local] (float32)."""
    v_local = logits.size(-1)
    n_real = vocab_size - vocab_start
    if n_real >= v_local:
        return logits
    neg = torch.finfo(logits.dtype).min / 4  # exp() underflows to 0; p*z stays finite (0 * big = 0)
    keep = torch.arange(v_local, device=logits.device) < n_real
    return logits.masked_fill(~keep, neg)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position. logits: [B, S, V_local] float32; targets: [B, S] → [B, S] (differentiable).

    megatron's vocab-parallel cross entropy overwrites fp32 logits in place, so it gets a clone when the caller
    still needs the logits (the entropy is computed from them)."""
    from megatron.core import tensor_parallel

    return -tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), targets)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Entropy of the full-vocabulary softmax per position. logits: [B, S, V_local] float32 → [B, S]."""
    local_max = logits.max(dim=-1).values
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
    z = logits - local_max.unsqueeze(-1)
    ez = torch.exp(z)
    sum_ez = ez.sum(dim=-1)
    sum_ez_z = (ez * z).sum(dim=-1)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        both = torch.stack([sum_ez, sum_ez_z])
        dist.all_reduce(both, group=tp_group)
        sum_ez, sum_ez_z = both[0], both[1]
    # H = log Z - E_p[z] with z shifted by the max: log Z = log sum_ez, E_p[z] = sum_ez_z / sum_ez
    return torch.log(sum_ez) - sum_ez_z / sum_ez
