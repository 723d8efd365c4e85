"""Soft-max value estimate V̂*(x) of OAPL (Ritter et al. 2026, arXiv 2602.19362, the value of the KL-regularized
optimum): V̂*(x) = β₁·log( (1/G)·Σ_i exp(r_i/β₁) ) over the G samples of a group.

    v = value_estimate(rewards, beta1=1.0)            # rewards: [P, G] → v: [P]
    v = value_estimate(rewards, beta1=1.0, mask=m)    # m: [P, G] bool, only valid samples count

Pure torch; no gradient flows through the rewards (the estimate is a regression target).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_rewards(rewards: Tensor, mask: Tensor | None, name: str = "rewards") -> None:
    if rewards.dim() != 2:
        raise ValueError(f"{name} must have shape [P, G] (prompts, samples per prompt); got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {rewards.dtype}")
    if mask is not None:
        if mask.shape != rewards.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal {name} shape {tuple(rewards.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor; got dtype {mask.dtype}")


def value_estimate(rewards: Tensor, beta1: float, mask: Tensor | None = None) -> Tensor:
    """V̂*(x) = β₁·log( (1/n)·Σ_{valid i} exp(r_i/β₁) ) per group (OAPL, V* estimate; A*-PO stage 1).

    Args:
        rewards: [P, G] rewards of G samples for each of P prompts.
        beta1: temperature β₁ > 0. β₁ → 0 gives max_i r_i; β₁ → ∞ gives the mean reward (GRPO's baseline).
        mask: optional [P, G] bool; only True entries count (n = number of valid samples of the group).
            Values of masked-out rewards are ignored, even if they are inf/NaN.

    Returns:
        [P] value estimates, detached, in the dtype of ``rewards``.

    Numerics: with m = max of the valid rewards and d_i = (r_i − m)/β₁ ≤ 0,
    V̂* = m + β₁·log1p( mean_i expm1(d_i) ). This is the max-shifted log-sum-exp written with expm1/log1p: it never
    overflows (d_i ≤ 0, so r/β₁ of 1e8 is fine) and, unlike β₁·(logsumexp − log n), it does not cancel
    catastrophically when β₁ is large (there it tends to m + mean(r − m) = mean r to full precision). The argument of
    log1p is ≥ 1/n − 1 > −1 because the maximum contributes expm1(0) = 0, so the result is always finite.
    """
    if not (isinstance(beta1, (int, float)) and math.isfinite(beta1) and beta1 > 0):
        raise ValueError(f"beta1 must be a finite number > 0; got {beta1!r}")
    _check_rewards(rewards, mask)
    r = rewards.detach()
    if mask is None:
        mask = torch.ones_like(r, dtype=torch.bool)
    count = mask.sum(dim=-1)  # [P]
    if bool((count == 0).any()):
        empty = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"value_estimate: groups {empty[:10]} have no valid sample (mask all False)")
    neg_inf = torch.tensor(-math.inf, dtype=r.dtype, device=r.device)
    m = torch.where(mask, r, neg_inf).amax(dim=-1, keepdim=True)  # [P, 1], finite: every group has a valid entry
    # Masked entries get d = −inf → expm1 = −1, then are zeroed so they drop out of the sum.
    d = torch.where(mask, (r - m) / beta1, neg_inf)  # [P, G], ≤ 0
    e = torch.where(mask, torch.expm1(d), torch.zeros_like(d))
    mean_e = e.sum(dim=-1) / count.to(r.dtype)  # [P], in [1/n − 1, 0]
    return m.squeeze(-1) + beta1 * torch.log1p(mean_e)
