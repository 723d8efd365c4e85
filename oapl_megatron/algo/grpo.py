"""GRPO baselines with importance sampling against the (lagged) inference policy.

Group-relative advantages (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, §4.1.2):
A_i = (r_i − mean(r)) / (std(r) + ε) over the G samples of a prompt.

Three policy-gradient surrogates, selected by ``ratio``; ρ compares the policy being trained to π_vllm, the
policy that sampled the data (possibly ``lag`` optimizer steps old):

* ``"token"``: PPO clipped surrogate per token (Schulman et al. 2017, arXiv 1707.06347, eq. 7),
  ρ_t = exp(log π_θ − log π_vllm), term_t = −min(ρ_t·A, clip(ρ_t, 1−ε, 1+ε)·A), averaged over tokens.
* ``"sequence"``: GSPO (Zheng et al. 2025, arXiv 2507.18071, eq. 5–7): one length-normalized sequence ratio
  s_i = exp(mean_t(log π_θ − log π_vllm)), term_i = −min(s_i·A_i, clip(s_i, 1−ε, 1+ε)·A_i), averaged over
  sequences. (GSPO's paper uses a much smaller ε, ~3e-4 to 4e-4, because s_i is a per-token geometric mean.)
* ``"truncated"``: truncated importance sampling (TIS; Ionides 2008; Yao et al. 2025 "Your efficient RL framework
  secretly brings you off-policy RL training"): term_t = −min(ρ_t, cap)·A·log π_θ with the weight detached, so the
  gradient is −min(ρ_t, cap)·A·∇log π_θ. Its value is not a meaningful objective, only its gradient.

Denominators are explicit (``num_tokens`` for token/truncated, ``num_sequences`` for sequence) so gradient
accumulation over micro-batches and DP ranks reproduces the one-big-batch gradient (STYLE.md principle 7).

    adv = grpo_advantages(rewards)                                                    # [P, G]
    loss, metrics = grpo_loss(tok_logp, tok_ref, tok_mask, adv.flatten(), ratio="token", num_tokens=n_tok)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from oapl_megatron.algo.value import _check_rewards

RatioKind = Literal["token", "sequence", "truncated"]


def grpo_advantages(
    rewards: Tensor, normalize_std: bool = True, eps: float = 1e-6, mask: Tensor | None = None
) -> Tensor:
    """Group-relative advantages (r − mean_group) / (std_group + eps).

    Args:
        rewards: [P, G] rewards.
        normalize_std: divide by the group's standard deviation (Bessel-corrected, as torch.std, TRL and verl do);
            False gives the Dr. GRPO variant (mean-centred only).
        eps: added to the std so that groups with equal rewards (std 0) give A = 0, not NaN.
        mask: optional [P, G] bool; only valid samples enter the mean/std; invalid entries get A = 0.

    Returns:
        [P, G] detached advantages. Groups with a single valid sample have A = 0.
    """
    _check_rewards(rewards, mask)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    r = rewards.detach()
    if mask is None:
        mask = torch.ones_like(r, dtype=torch.bool)
    zeros = torch.zeros_like(r)
    n = mask.sum(dim=-1, keepdim=True).to(r.dtype)  # [P, 1]
    r0 = torch.where(mask, r, zeros)
    mean = r0.sum(dim=-1, keepdim=True) / n.clamp(min=1)  # [P, 1]
    centred = torch.where(mask, r - mean, zeros)  # [P, G]
    if normalize_std:
        var = centred.square().sum(dim=-1, keepdim=True) / (n - 1).clamp(min=1)  # unbiased; 0 for n ≤ 1
        centred = centred / (var.sqrt() + eps)
    return centred


def _masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    # where, not multiply: padded positions may hold inf/NaN (0·inf = NaN would poison the sum and the gradient).
    return torch.where(mask, x, torch.zeros_like(x)).sum()


def grpo_loss(
    token_logp: Tensor,
    token_ref_logp: Tensor,
    token_mask: Tensor,
    advantages: Tensor,
    *,
    ratio: RatioKind = "token",
    clip_eps: float = 0.2,
    tis_cap: float = 2.0,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance-sampled GRPO surrogate over one micro-batch (see the module docstring for the three variants).

    Args:
        token_logp: [N, T] per-token log-probs of the sampled tokens under the policy being trained.
        token_ref_logp: [N, T] per-token log-probs under π_vllm (the sampling policy); constant.
        token_mask: [N, T] bool, True on response tokens that count.
        advantages: [N] one advantage per sequence (e.g. ``grpo_advantages(rewards).flatten()``); constant.
        ratio: "token" | "sequence" | "truncated".
        clip_eps: PPO/GSPO clip range ε (token and sequence), 0 < ε < 1.
        tis_cap: cap of the truncated importance weight (truncated), ≥ 1.
        num_tokens: denominator for "token"/"truncated": global count of valid tokens of the step. None = the
            valid tokens in this call.
        num_sequences: denominator for "sequence": global count of sequences of the step. None = the sequences in
            this call with at least one valid token. A caller may pass both counts; each variant uses its own.

    Returns:
        (loss, metrics); metrics are detached 0-dim tensors over this call's valid tokens (sequences for
        "sequence"): ``clip_frac`` fraction whose gradient is cut by the clip (ρ > 1+ε with A > 0 or ρ < 1−ε with
        A < 0; for "truncated": ρ > cap), ``ratio_mean``, ``ratio_max``, ``kl_k1`` = Σ_tokens (ref − logp) / sequences:
        the k1 estimate of KL(π_vllm‖π_θ) per *sequence*, the same quantity OAPL's ``kl_k1`` reports, so the two
        objectives' drift can be compared (per token it would be ≈ 1/response-length smaller).
    """
    if token_logp.dim() != 2:
        raise ValueError(f"token_logp must have shape [N, T]; got {tuple(token_logp.shape)}")
    if token_ref_logp.shape != token_logp.shape:
        raise ValueError(f"token_ref_logp shape {tuple(token_ref_logp.shape)} must equal token_logp shape "
                         f"{tuple(token_logp.shape)}")
    if token_mask.shape != token_logp.shape or token_mask.dtype != torch.bool:
        raise ValueError(f"token_mask must be a bool tensor of shape {tuple(token_logp.shape)}; got "
                         f"{token_mask.dtype} {tuple(token_mask.shape)}")
    if advantages.shape != token_logp.shape[:1]:
        raise ValueError(f"advantages must have shape [N]={tuple(token_logp.shape[:1])}; got "
                         f"{tuple(advantages.shape)}")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1); got {clip_eps!r}")
    if not tis_cap >= 1:
        raise ValueError(f"tis_cap must be >= 1; got {tis_cap!r}")

    mask = token_mask
    adv = advantages.detach()
    # Zero the log-ratio on padding before exp so garbage there cannot produce inf/NaN.
    log_ratio = torch.where(mask, token_logp - token_ref_logp.detach(), torch.zeros_like(token_logp))  # [N, T]
    n_valid_tok = mask.sum()

    if ratio in ("token", "truncated"):
        denom = float(n_valid_tok) if num_tokens is None else num_tokens
        _check_positive(denom, "num_tokens")
        rho = torch.exp(log_ratio)  # [N, T]
        a = adv.unsqueeze(-1)  # [N, 1], broadcast over tokens
        if ratio == "token":
            unclipped = rho * a
            clipped = torch.clamp(rho, 1.0 - clip_eps, 1.0 + clip_eps) * a
            per_tok = -torch.minimum(unclipped, clipped)  # [N, T]
            cut = ((rho > 1.0 + clip_eps) & (a > 0)) | ((rho < 1.0 - clip_eps) & (a < 0))
        else:
            weight = torch.clamp(rho.detach(), max=tis_cap)
            per_tok = -weight * a * token_logp
            cut = rho.detach() > tis_cap
        loss = _masked_sum(per_tok, mask) / denom
        with torch.no_grad():
            n_f = n_valid_tok.clamp(min=1).to(log_ratio.dtype)
            rho_d = rho.detach()
            metrics = {
                "clip_frac": _masked_sum(cut.to(log_ratio.dtype), mask) / n_f,
                "ratio_mean": _masked_sum(rho_d, mask) / n_f,
                "ratio_max": torch.where(mask, rho_d, torch.zeros_like(rho_d)).max() if mask.any()
                else torch.zeros((), dtype=rho_d.dtype),
            }
    elif ratio == "sequence":
        lengths = mask.sum(dim=-1)  # [N]
        seq_valid = lengths > 0
        denom = float(seq_valid.sum()) if num_sequences is None else num_sequences
        _check_positive(denom, "num_sequences")
        seq_log_ratio = log_ratio.sum(dim=-1) / lengths.clamp(min=1).to(log_ratio.dtype)  # [N], length-normalized
        s = torch.exp(seq_log_ratio)  # [N]
        unclipped = s * adv
        clipped = torch.clamp(s, 1.0 - clip_eps, 1.0 + clip_eps) * adv
        per_seq = -torch.minimum(unclipped, clipped)  # [N]
        loss = _masked_sum(per_seq, seq_valid) / denom
        with torch.no_grad():
            n_f = seq_valid.sum().clamp(min=1).to(log_ratio.dtype)
            s_d = s.detach()
            cut = ((s_d > 1.0 + clip_eps) & (adv > 0)) | ((s_d < 1.0 - clip_eps) & (adv < 0))
            metrics = {
                "clip_frac": _masked_sum(cut.to(s_d.dtype), seq_valid) / n_f,
                "ratio_mean": _masked_sum(s_d, seq_valid) / n_f,
                "ratio_max": torch.where(seq_valid, s_d, torch.zeros_like(s_d)).max() if seq_valid.any()
                else torch.zeros((), dtype=s_d.dtype),
            }
    else:
        raise ValueError(f"ratio must be one of 'token', 'sequence', 'truncated'; got {ratio!r}")

    with torch.no_grad():
        n_seq = mask.any(dim=1).sum().clamp(min=1).to(log_ratio.dtype)
        metrics["kl_k1"] = _masked_sum(-log_ratio.detach(), mask) / n_seq  # per sequence, like OAPL's
    return loss, metrics


def _check_positive(denom: float, name: str) -> None:
    if isinstance(denom, bool) or not isinstance(denom, (int, float)) or not math.isfinite(denom) or denom <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (the global count decided once per step); got {denom!r}")
