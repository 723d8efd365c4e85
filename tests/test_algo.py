"""Tests of the pure RL math (oapl_megatron.algo) against independent float64 / arbitrary-precision references.

References are plain Python loops (mpmath at 50 digits for the value estimate), not the vectorized code under test.
"""

from __future__ import annotations

import math
import random

import mpmath
import numpy as np
import pytest
import torch

from oapl_megatron.algo import (
    StaleSampleError,
    SyncSchedule,
    check_staleness,
    grpo_advantages,
    grpo_loss,
    oapl_advantages,
    oapl_loss,
    oapl_sequence_loss,
    sequence_logprobs,
    staleness,
    value_estimate,
    zero_signal_fraction,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# references (loops)


def ref_value(rewards: list[list[float]], beta1: float, mask: list[list[bool]] | None = None) -> list[float]:
    out = []
    with mpmath.workdps(50):
        for p, row in enumerate(rewards):
            vals = [r for g, r in enumerate(row) if mask is None or mask[p][g]]
            b = mpmath.mpf(beta1)
            s = mpmath.fsum(mpmath.exp(mpmath.mpf(r) / b) for r in vals)
            out.append(float(b * mpmath.log(s / len(vals))))
    return out


def ref_oapl(logp, ref, rewards, beta1, beta2, mask=None, denom=None):
    v = ref_value(rewards, beta1, mask)
    total, n = 0.0, 0
    for p in range(len(rewards)):
        for g in range(len(rewards[p])):
            if mask is not None and not mask[p][g]:
                continue
            res = beta2 * (logp[p][g] - ref[p][g]) - (rewards[p][g] - v[p])
            total += res * res
            n += 1
    return total / (denom if denom is not None else n)


def ref_grpo_adv(rewards, normalize_std=True, eps=1e-6):
    out = []
    for row in rewards:
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (len(row) - 1))
        out.append([(r - mean) / (std + eps) if normalize_std else r - mean for r in row])
    return out


def ref_grpo(logp, ref, mask, adv, ratio, eps=0.2, cap=2.0):
    """Loss value of each variant with plain loops (token-mean or sequence-mean)."""
    total, n_tok, n_seq = 0.0, 0, 0
    for i in range(len(logp)):
        toks = [t for t in range(len(logp[i])) if mask[i][t]]
        if ratio == "sequence":
            if not toks:
                continue
            s = math.exp(sum(logp[i][t] - ref[i][t] for t in toks) / len(toks))
            total += -min(s * adv[i], min(max(s, 1 - eps), 1 + eps) * adv[i])
            n_seq += 1
            continue
        for t in toks:
            rho = math.exp(logp[i][t] - ref[i][t])
            if ratio == "token":
                total += -min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
            else:
                total += -min(rho, cap) * adv[i] * logp[i][t]
            n_tok += 1
    return total / (n_seq if ratio == "sequence" else n_tok)


def rand_batch(seed: int, P: int = 5, G: int = 4, binary: bool = True):
    g = torch.Generator().manual_seed(seed)
    if binary:
        rewards = (torch.rand(P, G, generator=g) < 0.4).to(F64)
    else:
        rewards = torch.randn(P, G, generator=g, dtype=F64)
    ref = -torch.rand(P, G, generator=g, dtype=F64) * 30.0
    logp = ref + 0.5 * torch.randn(P, G, generator=g, dtype=F64)
    return logp, ref, rewards


def rand_tokens(seed: int, N: int = 6, T: int = 7, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    ref = -torch.rand(N, T, generator=g, dtype=F64) * 3.0
    logp = ref + spread * torch.randn(N, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(N, generator=g, dtype=F64)
    return logp, ref, mask, adv


# ----------------------------------------------------------------------------------------------------------------
# value estimate


@pytest.mark.parametrize("beta1", [1e-3, 0.5, 1.0, 10.0, 1e3])
def test_value_estimate_matches_reference(beta1):
    _, _, rewards = rand_batch(0, P=6, G=5, binary=False)
    got = value_estimate(rewards, beta1)
    want = torch.tensor(ref_value(rewards.tolist(), beta1), dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_value_estimate_binary_closed_form():
    # With 0/1 rewards and beta1 = 1: V = log(1 + p(e − 1)) for success rate p.
    rewards = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)
    p = rewards.mean(-1)
    torch.testing.assert_close(value_estimate(rewards, 1.0), torch.log1p(p * (math.e - 1)), rtol=0, atol=1e-15)


def test_value_estimate_limits():
    _, _, rewards = rand_batch(1, P=8, G=6, binary=False)
    G = rewards.shape[1]
    # beta1 → 0: max over the group; the gap is in [0, beta1·log G] (β₁·log(k/G) when k samples tie at the max).
    b = 1e-6
    gap = rewards.amax(-1) - value_estimate(rewards, b)
    assert bool((gap >= -1e-12).all()) and bool((gap <= b * math.log(G) + 1e-12).all()), gap
    # beta1 → ∞: mean; V − mean ≈ Var/(2β₁) ≤ (range²/8)/β₁. With randn rewards the range is < 8 → < 8e-6 at 1e6.
    b = 1e6
    diff = value_estimate(rewards, b) - rewards.mean(-1)
    assert bool((diff >= -1e-9).all()) and bool((diff <= 8.0 / b).all()), diff
    # float32 keeps the large-β₁ limit too (no log G cancellation): error ≲ 1e-5 for O(1) rewards.
    torch.testing.assert_close(value_estimate(rewards.float(), 1e8), rewards.float().mean(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("beta1", [1e-4, 1.0, 1e4])
def test_value_and_loss_finite_for_extreme_rewards(beta1, dtype):
    rewards = torch.tensor([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, -1e4], [3.0, 1e4, -2.0, 5.0]], dtype=dtype)
    v = value_estimate(rewards, beta1)
    assert torch.isfinite(v).all(), v
    assert bool((v <= rewards.amax(-1) + 1e-3 * 1e4).all()) and bool((v >= rewards.mean(-1) - 1.0).all())
    want = torch.tensor(ref_value(rewards.double().tolist(), beta1), dtype=F64)
    torch.testing.assert_close(v.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-3)
    logp = torch.zeros_like(rewards, requires_grad=True)
    loss, metrics = oapl_loss(logp, torch.zeros_like(rewards), rewards, beta1, 1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(m).all() for m in metrics.values())


def test_value_estimate_mask_counts_only_valid():
    _, _, rewards = rand_batch(2, P=4, G=6, binary=False)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool
    )
    garbage = rewards.masked_fill(~mask, float("nan"))  # masked entries must be ignored even when NaN
    got = value_estimate(garbage, 0.7, mask)
    want = torch.tensor(ref_value(rewards.tolist(), 0.7, mask.tolist()), dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"groups \[1\] have no valid sample"):
        value_estimate(rewards, 1.0, mask & torch.tensor([[True], [False], [True], [True]]))


def test_value_estimate_input_errors():
    with pytest.raises(ValueError, match="beta1"):
        value_estimate(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        value_estimate(torch.zeros(6), 1.0)
    with pytest.raises(TypeError, match="mask must be a bool"):
        value_estimate(torch.zeros(2, 3), 1.0, torch.ones(2, 3))


# ----------------------------------------------------------------------------------------------------------------
# OAPL loss


@pytest.mark.parametrize("beta1,beta2", [(1.0, 1e-3), (0.5, 0.1), (3.0, 1.0)])
def test_oapl_loss_matches_reference(beta1, beta2):
    logp, ref, rewards = rand_batch(3, P=5, G=4, binary=True)
    loss, metrics = oapl_loss(logp, ref, rewards, beta1, beta2)
    want = ref_oapl(logp.tolist(), ref.tolist(), rewards.tolist(), beta1, beta2)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert metrics["sq_residual"].item() == pytest.approx(want, rel=1e-12)
    v = ref_value(rewards.tolist(), beta1)
    adv = [abs(rewards[p, g].item() - v[p]) for p in range(5) for g in range(4)]
    assert metrics["adv_abs"].item() == pytest.approx(sum(adv) / len(adv), rel=1e-12)
    assert metrics["log_ratio"].item() == pytest.approx((logp - ref).mean().item(), rel=1e-12)
    assert metrics["kl_k1"].item() == pytest.approx((ref - logp).mean().item(), rel=1e-12)
    zero = sum(len(set(row)) == 1 for row in rewards.tolist()) / 5
    assert metrics["zero_signal_frac"].item() == pytest.approx(zero)
    # explicit denominator: sum / num_sequences
    loss_d, _ = oapl_loss(logp, ref, rewards, beta1, beta2, num_sequences=64.0)
    assert loss_d.item() == pytest.approx(want * 20 / 64, rel=1e-12)


def test_oapl_no_grad_through_rewards_or_ref_and_gradient_formula():
    logp, ref, rewards = rand_batch(4)
    logp.requires_grad_(True)
    ref.requires_grad_(True)
    rewards.requires_grad_(True)
    beta1, beta2 = 1.0, 0.1
    loss, _ = oapl_loss(logp, ref, rewards, beta1, beta2)
    loss.backward()
    assert ref.grad is None and rewards.grad is None
    # d/dlogp = 2·β₂·residual / N
    adv = oapl_advantages(rewards.detach(), beta1)
    residual = beta2 * (logp.detach() - ref.detach()) - adv
    torch.testing.assert_close(logp.grad, 2 * beta2 * residual / logp.numel(), rtol=1e-12, atol=1e-15)


def test_oapl_gradcheck():
    logp, ref, rewards = rand_batch(5, P=3, G=4)
    logp.requires_grad_(True)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2:] = False
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda lp: oapl_loss(lp, ref, rewards, 0.8, 0.05, mask=m, num_sequences=7.0)[0], (logp,)
        )


def test_oapl_mask_equals_groups_computed_separately():
    logp, ref, rewards = rand_batch(6, P=3, G=5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    bad = torch.tensor(float("inf"), dtype=F64)
    lp = logp.masked_fill(~mask, bad).requires_grad_(True)  # padding with inf must not leak into loss or grad
    loss, metrics = oapl_loss(lp, ref.masked_fill(~mask, -bad), rewards.masked_fill(~mask, bad), 1.0, 0.1, mask=mask)
    loss.backward()
    total, n = 0.0, 0
    for p in range(3):
        sel = mask[p]
        l_p, _ = oapl_loss(logp[p, sel][None], ref[p, sel][None], rewards[p, sel][None], 1.0, 0.1,
                           num_sequences=1.0)
        total += l_p.item()
        n += int(sel.sum())
    assert loss.item() == pytest.approx(total / n, rel=1e-12)
    assert metrics["num_sequences"].item() == n
    assert torch.isfinite(lp.grad).all() and bool((lp.grad[~mask] == 0).all())


def test_oapl_microbatches_with_explicit_denominator_equal_full_batch():
    # Sequences of one group land in different micro-batches: advantages come from whole groups once per step.
    P, G = 6, 4
    logp, ref, rewards = rand_batch(7, P=P, G=G)
    beta1, beta2 = 1.0, 0.05
    full = logp.clone().requires_grad_(True)
    oapl_loss(full, ref, rewards, beta1, beta2)[0].backward()

    adv = oapl_advantages(rewards, beta1).reshape(-1)  # [P·G]
    flat = logp.reshape(-1).clone().requires_grad_(True)
    perm = torch.randperm(P * G, generator=torch.Generator().manual_seed(0))
    total = 0.0
    for idx in perm.split(5):  # uneven micro-batches (5, 5, 5, 5, 4), like 2 DP ranks × several micro-batches
        loss, _ = oapl_sequence_loss(flat[idx], ref.reshape(-1)[idx], adv[idx], beta2, denom=P * G)
        loss.backward()
        total += loss.item()
    torch.testing.assert_close(flat.grad.reshape(P, G), full.grad, rtol=1e-12, atol=1e-16)
    assert total == pytest.approx(oapl_loss(logp, ref, rewards, beta1, beta2)[0].item(), rel=1e-12)


def test_sequence_logprobs_sums_valid_tokens_only():
    logp, _, mask, _ = rand_tokens(17)
    dirty = logp.masked_fill(~mask, float("-inf")).requires_grad_(True)
    got = sequence_logprobs(dirty, mask)
    want = [sum(logp[i, t].item() for t in range(logp.shape[1]) if mask[i, t]) for i in range(logp.shape[0])]
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert torch.equal(dirty.grad, mask.to(F64))
    with pytest.raises(ValueError, match="token_mask a bool"):
        sequence_logprobs(logp, mask.long())


def test_oapl_input_errors():
    logp, ref, rewards = rand_batch(8)
    with pytest.raises(ValueError, match="beta2"):
        oapl_loss(logp, ref, rewards, 1.0, 0.0)
    with pytest.raises(ValueError, match="ref_logp shape"):
        oapl_loss(logp, ref[:, :2], rewards, 1.0, 0.1)
    with pytest.raises(ValueError, match="num_sequences"):
        oapl_loss(logp, ref, rewards, 1.0, 0.1, num_sequences=0)
    with pytest.raises(ValueError, match="denom"):
        oapl_sequence_loss(logp[0], ref[0], rewards[0], 0.1, denom=-1.0)


def test_zero_signal_fraction():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    assert zero_signal_fraction(r).item() == pytest.approx(0.5)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert zero_signal_fraction(r, mask).item() == pytest.approx(0.75)
    assert bool((oapl_advantages(r, 1.0)[[0, 2]] == 0).all())


# ----------------------------------------------------------------------------------------------------------------
# GRPO


def test_grpo_advantages_match_reference_and_mask():
    _, _, rewards = rand_batch(9, P=5, G=6, binary=True)
    for norm in (True, False):
        got = grpo_advantages(rewards, normalize_std=norm)
        want = torch.tensor(ref_grpo_adv(rewards.tolist(), norm), dtype=F64)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # equal rewards → 0 (not NaN); a single valid sample → 0
    assert bool((grpo_advantages(torch.ones(2, 4)) == 0).all())
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    got = grpo_advantages(rewards[:2], mask=mask)
    want0 = ref_grpo_adv([rewards[0, :3].tolist()])[0]
    torch.testing.assert_close(got[0, :3], torch.tensor(want0, dtype=F64), rtol=1e-12, atol=1e-12)
    assert bool((got[0, 3:] == 0).all()) and bool((got[1] == 0).all())


@pytest.mark.parametrize("ratio", ["token", "sequence", "truncated"])
def test_grpo_loss_matches_reference(ratio):
    logp, ref, mask, adv = rand_tokens(10, spread=0.3)
    loss, metrics = grpo_loss(logp, ref, mask, adv, ratio=ratio, clip_eps=0.2, tis_cap=1.2)
    want = ref_grpo(logp.tolist(), ref.tolist(), mask.tolist(), adv.tolist(), ratio, eps=0.2, cap=1.2)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert 0.0 <= metrics["clip_frac"].item() <= 1.0
    rho = torch.exp(logp - ref)[mask]
    if ratio != "sequence":
        assert metrics["ratio_max"].item() == pytest.approx(rho.max().item(), rel=1e-12)
        assert metrics["ratio_mean"].item() == pytest.approx(rho.mean().item(), rel=1e-12)
    # KL(π_vllm‖π) per sequence (OAPL's unit): the token sum over the sequences that have a token
    n_seq = mask.any(dim=1).sum().item()
    assert metrics["kl_k1"].item() == pytest.approx((ref - logp)[mask].sum().item() / n_seq, rel=1e-12)


@pytest.mark.parametrize("ratio", ["token", "sequence", "truncated"])
def test_grpo_gradcheck(ratio):
    # Log-ratios within ±0.05 stay away from the clip kinks at 1 ± 0.2, where the surrogate is not differentiable.
    logp, ref, mask, adv = rand_tokens(11, N=4, T=5, spread=0.05)
    if ratio == "truncated":
        # TIS detaches its weight, so its value is not the function its gradient belongs to, except where every
        # weight sits at the cap (ρ > cap: weight constant); the uncapped regime is checked in the test below.
        logp = logp + 1.0
    logp.requires_grad_(True)
    kw = {"num_sequences": 9.0} if ratio == "sequence" else {"num_tokens": 17.0}
    assert torch.autograd.gradcheck(lambda lp: grpo_loss(lp, ref, mask, adv, ratio=ratio, **kw)[0], (logp,))


def test_grpo_truncated_gradient_matches_reference():
    logp, ref, mask, adv = rand_tokens(16, spread=1.0)  # ρ spans both sides of the cap
    cap = 1.5
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, ref, mask, adv, ratio="truncated", tis_cap=cap, num_tokens=20.0)[0].backward()
    rho = torch.exp(logp - ref)
    assert bool((rho[mask] > cap).any()) and bool((rho[mask] < cap).any())
    want = [[-min(math.exp(logp[i, t] - ref[i, t]), cap) * adv[i].item() / 20.0 if mask[i, t] else 0.0
             for t in range(logp.shape[1])] for i in range(logp.shape[0])]
    torch.testing.assert_close(lp.grad, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-15)


def test_grpo_on_policy_gradient_is_policy_gradient():
    # At ρ = 1 all three variants give −A·∇log π per token (token/truncated) or per mean token (sequence).
    logp, _, mask, adv = rand_tokens(12)
    ref = logp.clone()
    for ratio in ("token", "truncated"):
        lp = logp.clone().requires_grad_(True)
        grpo_loss(lp, ref, mask, adv, ratio=ratio, num_tokens=10.0)[0].backward()
        want = torch.where(mask, -adv[:, None].expand_as(mask) / 10.0, torch.zeros_like(lp))
        torch.testing.assert_close(lp.grad, want, rtol=1e-12, atol=1e-15)
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, ref, mask, adv, ratio="sequence", num_sequences=3.0)[0].backward()
    lengths = mask.sum(-1, keepdim=True).to(F64)
    want = torch.where(mask, -adv[:, None] / lengths / 3.0, torch.zeros_like(lp))
    torch.testing.assert_close(lp.grad, want, rtol=1e-12, atol=1e-15)


def test_grpo_clip_fraction_far_from_one():
    N, T = 4, 3
    mask = torch.ones(N, T, dtype=torch.bool)
    ref = torch.zeros(N, T, dtype=F64)
    # ratio e² ≫ 1 + ε: clipped (no gradient) when A > 0, unclipped (pessimistic branch) when A < 0.
    for adv_sign, expect_clip in ((1.0, 1.0), (-1.0, 0.0)):
        lp = torch.full((N, T), 2.0, dtype=F64, requires_grad=True)
        loss, m = grpo_loss(lp, ref, mask, torch.full((N,), adv_sign, dtype=F64), ratio="token")
        loss.backward()
        assert m["clip_frac"].item() == expect_clip
        assert m["ratio_max"].item() == pytest.approx(math.exp(2.0))
        assert bool((lp.grad == 0).all()) == (expect_clip == 1.0)
    # ratio e⁻² ≪ 1 − ε: clipped when A < 0.
    lp = torch.full((N, T), -2.0, dtype=F64, requires_grad=True)
    loss, m = grpo_loss(lp, ref, mask, torch.full((N,), -1.0, dtype=F64), ratio="token")
    loss.backward()
    assert m["clip_frac"].item() == 1.0 and bool((lp.grad == 0).all())
    # sequence ratio: mean log-ratio 2 → clipped for A > 0
    _, m = grpo_loss(torch.full((N, T), 2.0, dtype=F64), ref, mask, torch.ones(N, dtype=F64), ratio="sequence")
    assert m["clip_frac"].item() == 1.0
    # truncated: weight capped at tis_cap, gradient −cap·A per token
    lp = torch.full((N, T), 2.0, dtype=F64, requires_grad=True)
    loss, m = grpo_loss(lp, ref, mask, torch.ones(N, dtype=F64), ratio="truncated", tis_cap=2.0)
    loss.backward()
    assert m["clip_frac"].item() == 1.0
    torch.testing.assert_close(lp.grad, torch.full((N, T), -2.0 / (N * T), dtype=F64))
    # near ratio 1: nothing clipped
    _, m = grpo_loss(torch.full((N, T), 0.01, dtype=F64), ref, mask, torch.ones(N, dtype=F64), ratio="token")
    assert m["clip_frac"].item() == 0.0


@pytest.mark.parametrize("ratio", ["token", "sequence", "truncated"])
def test_grpo_microbatches_with_explicit_denominator_equal_full_batch(ratio):
    logp, ref, mask, adv = rand_tokens(13, N=10, T=6, spread=0.4)
    full = logp.clone().requires_grad_(True)
    grpo_loss(full, ref, mask, adv, ratio=ratio)[0].backward()
    denom = {"num_sequences": 10.0, "num_tokens": float(mask.sum())}  # both, as the trainer passes them
    split = logp.clone().requires_grad_(True)
    for idx in torch.tensor([3, 7, 0, 9, 1, 5, 2, 8, 6, 4]).split(3):
        grpo_loss(split[idx], ref[idx], mask[idx], adv[idx], ratio=ratio, **denom)[0].backward()
    torch.testing.assert_close(split.grad, full.grad, rtol=1e-12, atol=1e-16)


def test_grpo_padding_garbage_is_ignored():
    logp, ref, mask, adv = rand_tokens(14)
    for ratio in ("token", "sequence", "truncated"):
        clean, _ = grpo_loss(logp, ref, mask, adv, ratio=ratio)
        lp = logp.masked_fill(~mask, float("nan")).requires_grad_(True)
        dirty, m = grpo_loss(lp, ref.masked_fill(~mask, float("-inf")), mask, adv, ratio=ratio)
        dirty.backward()
        assert dirty.item() == pytest.approx(clean.item(), rel=1e-12)
        assert torch.isfinite(lp.grad).all() and all(torch.isfinite(v) for v in m.values())


def test_grpo_input_errors():
    logp, ref, mask, adv = rand_tokens(15)
    with pytest.raises(ValueError, match="ratio must be one of"):
        grpo_loss(logp, ref, mask, adv, ratio="tokens")
    with pytest.raises(ValueError, match="num_tokens must be a finite number > 0"):
        grpo_loss(logp, ref, mask, adv, ratio="token", num_tokens=0, num_sequences=3.0)
    with pytest.raises(ValueError, match="num_sequences must be a finite number > 0"):
        grpo_loss(logp, ref, mask, adv, ratio="sequence", num_tokens=3.0, num_sequences=float("nan"))
    with pytest.raises(ValueError, match="token_mask must be a bool"):
        grpo_loss(logp, ref, mask.long(), adv)
    with pytest.raises(ValueError, match=r"advantages must have shape \[N\]"):
        grpo_loss(logp, ref, mask, adv[:2])
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_loss(logp, ref, mask, adv, clip_eps=1.5)


# ----------------------------------------------------------------------------------------------------------------
# lag


def test_sync_schedule_cases():
    s = SyncSchedule(lag=3)
    assert [s.should_sync(k) for k in range(8)] == [False, False, False, True, False, False, True, False]
    assert [s.version_at(k) for k in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert [s.steps_since_sync(k) for k in range(8)] == [0, 1, 2, 0, 1, 2, 0, 1]
    one = SyncSchedule(1)
    assert all(one.should_sync(k) for k in range(1, 6)) and not one.should_sync(0)
    assert [one.version_at(k) for k in range(4)] == [0, 1, 2, 3]
    # the number of syncs over a run equals the final version
    for lag in (1, 2, 5, 50):
        sched = SyncSchedule(lag)
        assert sum(sched.should_sync(k) for k in range(1, 201)) == sched.version_at(200)
    assert SyncSchedule(np.int64(4)).lag == 4 and type(SyncSchedule(np.int64(4)).lag) is int


def test_sync_schedule_validation():
    with pytest.raises(ValueError, match="lag must be >= 1; got 0"):
        SyncSchedule(0)
    with pytest.raises(TypeError, match="lag must be an int; got float"):
        SyncSchedule(2.5)
    with pytest.raises(TypeError, match="lag must be an int; got bool"):
        SyncSchedule(True)
    with pytest.raises(ValueError, match="step must be >= 0; got -1"):
        SyncSchedule(2).should_sync(-1)


def test_staleness_and_check():
    assert staleness(3, 5) == 2 and staleness(5, 5) == 0
    with pytest.raises(StaleSampleError, match="sample version 6 is newer than the current policy version 5"):
        staleness(6, 5)
    check_staleness([4, 5, 5, 3], current=5, max_staleness=2)
    with pytest.raises(StaleSampleError, match=r"sample 2 has policy version 1, staleness 4 > max_staleness 2 "
                                               r"\(current version 5; 2 of 4 samples too stale\)"):
        check_staleness([5, 4, 1, 0], current=5, max_staleness=2)
    with pytest.raises(StaleSampleError, match="sample 1 has policy version 7, newer than the current version 5"):
        check_staleness([5, 7], current=5, max_staleness=0)
    with pytest.raises(TypeError, match=r"versions\[1\] must be an int"):
        check_staleness([5, 4.0], current=5, max_staleness=1)
    check_staleness([], current=0, max_staleness=0)
    # random cross-check against the definition
    rng = random.Random(0)
    for _ in range(50):
        cur, mx = rng.randint(0, 9), rng.randint(0, 3)
        vs = [rng.randint(0, cur) for _ in range(rng.randint(1, 6))]
        ok = all(cur - v <= mx for v in vs)
        try:
            check_staleness(vs, cur, mx)
            assert ok
        except StaleSampleError as e:
            first = next(i for i, v in enumerate(vs) if cur - v > mx)
            assert not ok and str(e).startswith(f"sample {first} ")


def test_algo_imports_only_pure_modules():
    # STYLE.md principle 6: the math imports torch and the standard library, never distributed/megatron/vllm code.
    import ast
    import pathlib

    import oapl_megatron.algo as algo

    forbidden = ("torch.distributed", "megatron", "vllm", "transformers", "ray")
    for path in pathlib.Path(algo.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), f"{path.name}: {name}"
                assert not name.startswith("oapl_megatron.") or name.startswith("oapl_megatron.algo"), name
