"""The trainer's loss, gradients and log-probs do not depend on the parallel layout (4 gloo ranks, real megatron).

Layouts of one 4-rank world: TP1·PP1 (DP4), TP2·PP1 (DP2), TP1·PP2 (DP2), TP2·PP2 (DP1) and TP2·PP2 with one
sequence per micro-batch (gradient accumulation over 16 micro-batches vs 4). Tolerances (fp32 on CPU; the only
differences are summation orders of TP all-reduces and DP reductions):
  loss: relative 1e-6 · gradients: max |Δ| ≤ 1e-6 · max |g| (+1e-7) · token log-probs vs float64 transformers:
  ≤ 2e-5 absolute · entropy vs float64 transformers: ≤ 2e-5 absolute.
"""

from __future__ import annotations

import pytest
import torch

from dist_util import REPO, run_torchrun

WORKER = REPO / "tests" / "workers" / "trainer_parity_worker.py"
LOGP_TOL = 2e-5


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    run_torchrun(WORKER, 4, out, timeout=900)
    return torch.load(out / "result.pt", weights_only=False)


def _token_rows(values, lens):
    return [values[i][p - 1 : p - 1 + n].double() for i, (p, n) in enumerate(lens)]


@pytest.mark.slow
def test_loss_and_grads_equal_across_layouts(parity):
    res = parity["results"]
    base = res["tp1pp1"]
    assert len(base["grads"]) > 20  # every HF tensor has a gradient
    scale = max(g.abs().max().item() for g in base["grads"].values())
    assert scale > 1e-3
    for name in ("tp2pp1", "tp1pp2", "tp2pp2", "tp2pp2_mbs1"):
        r = res[name]
        assert r["loss"] == pytest.approx(base["loss"], rel=1e-6), name
        assert set(r["grads"]) == set(base["grads"]), name
        worst = max((r["grads"][k] - base["grads"][k]).abs().max().item() for k in base["grads"])
        assert worst <= 1e-6 * scale + 1e-7, f"{name}: max grad difference {worst:.3e} (scale {scale:.3e})"


@pytest.mark.slow
def test_logprobs_match_float64_transformers(parity):
    lens = list(zip(parity["prompt_lens"], parity["response_lens"]))
    ref_lp = [r[0] for r in parity["reference"]]
    ref_ent = [r[1] for r in parity["reference"]]
    for name in ("tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2"):
        got = _token_rows(parity["results"][name]["token_logp"], lens)
        ent = _token_rows(parity["results"][name]["entropy"], lens)
        assert max((a - b).abs().max().item() for a, b in zip(got, ref_lp)) <= LOGP_TOL, name
        assert max((a - b).abs().max().item() for a, b in zip(ent, ref_ent)) <= LOGP_TOL, name


@pytest.mark.slow
def test_optimizer_steps_lower_oapl_loss_and_nonfinite_step_is_skipped(parity):
    tr = parity["results"]["train"]
    losses = tr["train_losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses
    nan = tr["nan_step"]
    assert nan["skipped"] == 1.0 and nan["skipped_total"] == 1.0
    assert nan["max_weight_change"] == 0.0  # the non-finite step never reached the weights


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("logp_sweep")
    run_torchrun(WORKER, 4, out, timeout=900, env={"PARITY_MODE": "logp_sweep"})
    return torch.load(out / "result.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2_tied", "qwen3_tied", "qwen3_untied"])
@pytest.mark.parametrize("layout", ["tp2pp2", "tp1pp2"])
def test_logprobs_all_families(sweep, family, layout):
    lens = sweep[f"{family}/lens"]
    ref = sweep[f"{family}/reference"]
    got = _token_rows(sweep[f"{family}/{layout}"]["token_logp"], lens)
    ent = _token_rows(sweep[f"{family}/{layout}"]["entropy"], lens)
    assert max((a - r[0]).abs().max().item() for a, r in zip(got, ref)) <= LOGP_TOL
    assert max((a - r[1]).abs().max().item() for a, r in zip(ent, ref)) <= LOGP_TOL
