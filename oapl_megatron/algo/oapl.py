"""The OAPL loss (Ritter et al. 2026, "LLMs Can Learn to Reason Via Off-Policy RL", arXiv 2602.19362).

KL-regularized RL anchored at the lagged inference policy π_vllm has the optimum β·log(π*/π_vllm) = r − V*(x).
OAPL regresses onto that identity, one residual per sequence:

    loss = (1/N)·Σ_i ( β₂·(log π_θ(y_i|x) − log π_vllm(y_i|x)) − (r_i − V̂*(x)) )²

with sequence-level log-probabilities (sums over response tokens, no length normalization), V̂* from
:func:`~oapl_megatron.algo.value.value_estimate` over the group, no importance ratio and no clipping.

Two entry points:

    loss, metrics = oapl_loss(logp, ref_logp, rewards, beta1, beta2)            # whole groups: [P, G]

    adv = oapl_advantages(rewards, beta1)                                        # once per step: [P, G]
    for mb in micro_batches:                                                     # sequences of a group may be split
        loss, metrics = oapl_sequence_loss(mb.logp, mb.ref_logp, mb.adv, beta2, denom=num_sequences_in_step)
        loss.backward()

With ``denom`` fixed once per step to the global number of sequences (over micro-batches and DP ranks), the sum of
micro-batch gradients equals the gradient of the one-batch loss (STYLE.md principle 7).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from oapl_megatron.algo.value import _check_rewards, value_estimate


def _check_beta2(beta2: float) -> None:
    if not (isinstance(beta2, (int, float)) and math.isfinite(beta2) and beta2 > 0):
        raise ValueError(f"beta2 must be a finite number > 0; got {beta2!r}")


def _check_denom(denom: float | int, name: str) -> None:
    if isinstance(denom, bool) or not isinstance(denom, (int, float)) or not math.isfinite(denom) or denom <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (the global count decided once per step); got {denom!r}")


def sequence_logprobs(token_logp: Tensor, token_mask: Tensor) -> Tensor:
    """Σ_t log π(y_t|…) over response tokens: [N, T] token log-probs, [N, T] bool mask → [N].

    Padding positions may hold anything (inf/NaN included): they are replaced by 0 before the sum, so neither the
    value nor the gradient sees them. No length normalization (as in the official OAPL code).
    """
    if token_logp.dim() != 2 or token_mask.shape != token_logp.shape or token_mask.dtype != torch.bool:
        raise ValueError(f"token_logp must be [N, T] and token_mask a bool tensor of the same shape; got "
                         f"{tuple(token_logp.shape)} and {token_mask.dtype} {tuple(token_mask.shape)}")
    return torch.where(token_mask, token_logp, torch.zeros_like(token_logp)).sum(dim=-1)


def oapl_advantages(rewards: Tensor, beta1: float, mask: Tensor | None = None) -> Tensor:
    """Optimal-advantage targets A*_i = r_i − V̂*(x) for every sample of every group.

    Args:
        rewards: [P, G] rewards.
        beta1: temperature of the soft-max value estimate (> 0).
        mask: optional [P, G] bool of valid samples.

    Returns:
        [P, G] detached advantages; 0 where ``mask`` is False.
    """
    v = value_estimate(rewards, beta1, mask)  # [P]
    adv = rewards.detach() - v.unsqueeze(-1)  # [P, G]
    if mask is not None:
        adv = torch.where(mask, adv, torch.zeros_like(adv))
    return adv


def oapl_sequence_loss(
    logp_seq: Tensor,
    ref_logp_seq: Tensor,
    advantage: Tensor,
    beta2: float,
    denom: float,
    *,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_i (β₂·(logp_i − ref_logp_i) − A_i)² / denom over the sequences of one micro-batch.

    Args:
        logp_seq: [N] sequence log-probs Σ_t log π_θ(y_t|…) under the policy being trained (carries the gradient).
        ref_logp_seq: [N] sequence log-probs under π_vllm (the lagged sampling policy); treated as a constant.
        advantage: [N] targets r − V̂*(x), computed once per step from whole groups (:func:`oapl_advantages`);
            treated as a constant.
        beta2: KL strength β₂ > 0; the regression target of the log-ratio is A/β₂.
        denom: the number of sequences the step's loss is averaged over (global, all micro-batches and DP ranks).
        mask: optional [N] bool; False rows (padding) contribute nothing.

    Returns:
        (loss, metrics). ``loss`` is a 0-dim tensor. ``metrics`` are detached 0-dim tensors averaged over the
        valid sequences of this call: ``adv_abs`` mean |A|, ``log_ratio`` mean log(π_θ/π_vllm), ``sq_residual`` mean
        squared residual, ``kl_k1`` mean (ref − logp), an unbiased estimate of KL(π_vllm‖π_θ) per sequence when the
        samples come from π_vllm, ``kl_k2`` mean ½(logp − ref)² (≥ 0, lower variance), and ``num_sequences``.
    """
    if logp_seq.dim() != 1:
        raise ValueError(f"logp_seq must have shape [N]; got {tuple(logp_seq.shape)}")
    for name, t in (("ref_logp_seq", ref_logp_seq), ("advantage", advantage)):
        if t.shape != logp_seq.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal logp_seq shape {tuple(logp_seq.shape)}")
    if mask is not None and (mask.shape != logp_seq.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(logp_seq.shape)}; got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    _check_beta2(beta2)
    _check_denom(denom, "denom")

    log_ratio = logp_seq - ref_logp_seq.detach()  # [N]
    adv = advantage.detach()
    if mask is not None:
        # Zero padding rows *before* any arithmetic: they may hold inf/NaN, and masking only the result would still
        # send 0·inf = NaN back through the gradient of the square.
        log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))
        adv = torch.where(mask, adv, torch.zeros_like(adv))
    residual = beta2 * log_ratio - adv  # [N]; 0 on padding rows
    sq = residual.square()
    loss = sq.sum() / denom

    with torch.no_grad():
        valid = mask if mask is not None else torch.ones_like(log_ratio, dtype=torch.bool)
        n = valid.sum()
        n_f = n.clamp(min=1).to(log_ratio.dtype)

        def vmean(x: Tensor) -> Tensor:
            return torch.where(valid, x, torch.zeros_like(x)).sum() / n_f

        lr = log_ratio.detach()
        metrics = {
            "adv_abs": vmean(adv.abs()),
            "log_ratio": vmean(lr),
            "sq_residual": vmean(sq.detach()),
            "kl_k1": vmean(-lr),
            "kl_k2": vmean(0.5 * lr.square()),
            "num_sequences": n.to(log_ratio.dtype),
        }
    return loss, metrics


def oapl_loss(
    logp: Tensor,
    ref_logp: Tensor,
    rewards: Tensor,
    beta1: float,
    beta2: float,
    *,
    mask: Tensor | None = None,
    num_sequences: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """OAPL loss over whole groups: mean over valid sequences of (β₂·(logp − ref_logp) − (r − V̂*(x)))².

    Args:
        logp: [P, G] sequence log-probs under the policy being trained (sum over response tokens).
        ref_logp: [P, G] sequence log-probs under π_vllm; constant.
        rewards: [P, G] rewards; V̂* is computed from them and no gradient flows through them.
        beta1: value-estimate temperature β₁ > 0 (paper: 1).
        beta2: KL strength β₂ > 0 (paper: 1e-3 for 4B–14B models with long responses).
        mask: optional [P, G] bool of valid samples (groups with fewer samples); V̂* counts only valid ones.
        num_sequences: explicit denominator (global sequence count of the step). None = number of valid sequences
            here, i.e. a plain mean.

    Returns:
        (loss, metrics): metrics of :func:`oapl_sequence_loss` plus ``zero_signal_frac``, the fraction of groups
        whose valid rewards are all equal (their advantages are exactly 0: no learning signal).
    """
    _check_rewards(rewards, mask)
    for name, t in (("logp", logp), ("ref_logp", ref_logp)):
        if t.shape != rewards.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal rewards shape {tuple(rewards.shape)} [P, G]")
    adv = oapl_advantages(rewards, beta1, mask)  # [P, G]
    flat_mask = None if mask is None else mask.reshape(-1)
    if num_sequences is None:
        num_sequences = float(mask.sum()) if mask is not None else float(rewards.numel())
    _check_denom(num_sequences, "num_sequences")
    loss, metrics = oapl_sequence_loss(
        logp.reshape(-1), ref_logp.reshape(-1), adv.reshape(-1), beta2, num_sequences, mask=flat_mask
    )
    metrics["zero_signal_frac"] = zero_signal_fraction(rewards, mask)
    return loss, metrics


def zero_signal_fraction(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fraction of groups whose valid rewards are all equal (all right or all wrong): detached 0-dim tensor.

    Args:
        rewards: [P, G]; mask: optional [P, G] bool.
    """
    _check_rewards(rewards, mask)
    r = rewards.detach()
    if mask is None:
        mask = torch.ones_like(r, dtype=torch.bool)
    inf = torch.tensor(math.inf, dtype=r.dtype, device=r.device)
    hi = torch.where(mask, r, -inf).amax(dim=-1)
    lo = torch.where(mask, r, inf).amin(dim=-1)
    return (hi == lo).to(r.dtype).mean()
