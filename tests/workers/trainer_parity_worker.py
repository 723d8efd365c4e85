"""Multi-rank worker for tests/test_trainer_parity.py (4 gloo ranks).

For one fixed tiny HF model and one fixed OAPL batch, loops over trainer layouts of the same 4-rank world —
TP1·PP1 (DP4), TP2·PP1 (DP2), TP1·PP2 (DP2), TP2·PP2 (DP1), and TP2·PP2 with one sequence per micro-batch
(gradient accumulation) — and records on rank 0: the loss, the gradients gathered into HF names, the per-token
log-probs of every sequence, and a float64 transformers reference of those log-probs. Then, at TP2·PP2, a few
optimizer steps on the fixed batch (loss must fall) and one step with a non-finite advantage (must be skipped).
Writes ``$OAPL_TEST_OUT/result.pt`` from rank 0.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_tiny import make_model  # noqa: E402

from oapl_megatron.algo import oapl_advantages  # noqa: E402
from oapl_megatron.config.schema import ModelConfig, OAPLObjective, OptimConfig, ParallelConfig  # noqa: E402
from oapl_megatron.models.builder import build_policy  # noqa: E402
from oapl_megatron.models.hf_config import arch_from_hf, make_vocab_padding  # noqa: E402
from oapl_megatron.models.hf_io import iter_hf_weights, load_hf_weights  # noqa: E402
from oapl_megatron.parallel.bootstrap import init_distributed, set_model_parallel, shutdown  # noqa: E402
from oapl_megatron.trainer.batch import SequenceRecord, build_step_batch  # noqa: E402
from oapl_megatron.trainer.optimizer import wrap_and_build_optimizer  # noqa: E402
from oapl_megatron.trainer.step import apply_update, forward_backward, forward_logprobs  # noqa: E402

FAMILY = os.environ.get("PARITY_FAMILY", "qwen3_untied")
P, G = 4, 4
BETA1, BETA2 = 1.0, 0.5  # a large β2 so the log-ratio term matters in the gradient


def make_records(vocab: int) -> list[SequenceRecord]:
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randint(0, 2, (P, G), generator=gen).float()
    rewards[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # at least one group with signal
    adv = oapl_advantages(rewards, BETA1)
    recs = []
    for p in range(P):
        plen = 3 + p
        prompt = torch.randint(3, vocab, (plen,), generator=gen).tolist()
        for g in range(G):
            rlen = 2 + (p * G + g) % 7  # variable response lengths
            resp = torch.randint(3, vocab, (rlen,), generator=gen).tolist()
            ref = float(-2.0 * rlen + torch.randn((), generator=gen))
            recs.append(SequenceRecord(prompt, resp, advantage=float(adv[p, g]), ref_logp=ref,
                                       reward=float(rewards[p, g])))
    return recs


def gather(chunks, ctx, arch, tensor_of=None):
    """Full HF-named tensors on rank 0: the weights, or with ``tensor_of`` e.g. the DP-reduced gradients."""
    out = {}
    for name, t in iter_hf_weights(chunks, ctx, arch, dst_rank=0, include_tied_lm_head=False, tensor_of=tensor_of):
        out[name] = t.detach().clone().double()
    return out


def run_layout(tp, pp, mbs, hf_sd, arch, records, optim, steps=0, nan_step=False):
    ctx = set_model_parallel(tp, pp)
    chunks = build_policy(arch, ModelConfig(), ctx)
    load_hf_weights(chunks, ctx, arch, hf_sd)
    state = wrap_and_build_optimizer(chunks, optim, total_steps=100, bf16=False)
    padded = make_vocab_padding(arch.vocab_size, tp)
    batch = build_step_batch(records, dp_rank=ctx.dp_rank, dp_size=ctx.dp, micro_batch_size=mbs, pad_id=0)
    obj = OAPLObjective(beta1=BETA1, beta2=BETA2)
    res = {}
    metrics = forward_backward(state, batch, obj, ctx, arch.vocab_size, padded)
    res["loss"] = metrics["loss"]
    res["grads"] = gather(state.chunks, ctx, arch, tensor_of=lambda name, p: p.main_grad.view_as(p))
    lp = forward_logprobs(state.chunks, batch, ctx, arch.vocab_size, padded)
    # this DP rank's sequences, in order: rows of its micro-batches
    mine = [(mb_lp[i], mb_ent[i]) for (mb_lp, mb_ent) in lp for i in range(mbs)]
    allr = [None] * ctx.world_size
    dist.all_gather_object(allr, (ctx.dp_rank, ctx.tp_rank, ctx.pp_rank, mine))
    by_dp = {}
    for dp_rank, tp_rank, pp_rank, rows in allr:
        if tp_rank == 0 and pp_rank == 0:
            by_dp[dp_rank] = rows
    flat = [row for d in sorted(by_dp) for row in by_dp[d]][: len(records)]
    res["token_logp"] = [r[0] for r in flat]
    res["entropy"] = [r[1] for r in flat]
    if steps:
        losses = []
        for _ in range(steps):
            m = apply_update(state, forward_backward(state, batch, obj, ctx, arch.vocab_size, padded))
            losses.append(m["loss"])
        res["train_losses"] = losses
    if nan_step:
        before = gather(state.chunks, ctx, arch)
        bad = [SequenceRecord(r.prompt_ids, r.response_ids, advantage=float("nan") if i == 0 else r.advantage,
                              ref_logp=r.ref_logp) for i, r in enumerate(records)]
        bad_batch = build_step_batch(bad, dp_rank=ctx.dp_rank, dp_size=ctx.dp, micro_batch_size=mbs, pad_id=0)
        m = apply_update(state, forward_backward(state, bad_batch, obj, ctx, arch.vocab_size, padded))
        after = gather(state.chunks, ctx, arch)
        res["nan_step"] = {"skipped": m["skipped"], "skipped_total": m["skipped_total"],
                           "max_weight_change": max((after[k] - before[k]).abs().max().item() for k in before)
                           if before else 0.0}
    return res


def logp_sweep(ctx):
    """Forward-only log-probs for every family (tied and untied) at TP2·PP2 and TP1·PP2, against float64 HF."""
    out = {}
    for family in ("llama", "qwen2_tied", "qwen3_tied", "qwen3_untied"):
        model = make_model(family, seed=1)
        arch = arch_from_hf(model.config)
        hf_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        records = make_records(arch.vocab_size)
        for tp, pp in ((2, 2), (1, 2)):
            lctx = set_model_parallel(tp, pp)
            chunks = build_policy(arch, ModelConfig(), lctx)
            load_hf_weights(chunks, lctx, arch, hf_sd)
            batch = build_step_batch(records, dp_rank=lctx.dp_rank, dp_size=lctx.dp, micro_batch_size=4, pad_id=0)
            lp = forward_logprobs(chunks, batch, lctx, arch.vocab_size, make_vocab_padding(arch.vocab_size, tp))
            mine = [(a[i], e[i]) for (a, e) in lp for i in range(4)]
            allr = [None] * lctx.world_size
            dist.all_gather_object(allr, (lctx.dp_rank, lctx.tp_rank, lctx.pp_rank, mine))
            rows = [r for d in sorted({a[0]: a for a in allr if a[1] == 0 and a[2] == 0}.items())
                    for r in d[1][3]][: len(records)]
            out[f"{family}/tp{tp}pp{pp}"] = {"token_logp": [r[0] for r in rows], "entropy": [r[1] for r in rows]}
        if ctx.rank == 0:
            out[f"{family}/reference"] = reference_logprobs(model, records)
            out[f"{family}/lens"] = [(len(r.prompt_ids), len(r.response_ids)) for r in records]
    return out


def main():
    ctx = init_distributed(ParallelConfig(tp=1, pp=1, timeout_s=300), seed=0)
    if os.environ.get("PARITY_MODE") == "logp_sweep":
        out = logp_sweep(ctx)
        if ctx.rank == 0:
            torch.save(out, os.path.join(os.environ["OAPL_TEST_OUT"], "result.pt"))
        shutdown()
        return
    model = make_model(FAMILY, seed=0)
    arch = arch_from_hf(model.config)
    hf_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    records = make_records(arch.vocab_size)
    optim = OptimConfig(lr=1e-3, clip_grad=0.0, distributed=False)
    results = {}
    layouts = [("tp1pp1", 1, 1, 2), ("tp2pp1", 2, 1, 2), ("tp1pp2", 1, 2, 2), ("tp2pp2", 2, 2, 4),
               ("tp2pp2_mbs1", 2, 2, 1)]
    for name, tp, pp, mbs in layouts:
        results[name] = run_layout(tp, pp, mbs, hf_sd, arch, records, optim)
    # A few steps of the distributed optimizer at TP2·PP2 lower the loss on the fixed batch; then a NaN batch.
    results["train"] = run_layout(2, 2, 4, hf_sd, arch, records,
                                  OptimConfig(lr=3e-3, clip_grad=1.0, distributed=True), steps=6, nan_step=True)
    if ctx.rank == 0:
        ref = reference_logprobs(model, records)
        torch.save({"results": results, "reference": ref,
                    "response_lens": [len(r.response_ids) for r in records],
                    "prompt_lens": [len(r.prompt_ids) for r in records]},
                   os.path.join(os.environ["OAPL_TEST_OUT"], "result.pt"))
    shutdown()


def reference_logprobs(model, records):
    """float64 transformers (log-prob, entropy) of each response token (the oracle)."""
    m = model.double()
    out = []
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([r.prompt_ids + r.response_ids])
            logits = m(input_ids=ids).logits[0]  # [L, V]
            lp = torch.log_softmax(logits, dim=-1)
            p, n = len(r.prompt_ids), len(r.response_ids)
            tgt = ids[0, p:]
            rows = lp[p - 1 : p - 1 + n]
            out.append((rows.gather(1, tgt[:, None])[:, 0], -(rows.exp() * rows).sum(-1)))
    return out


if __name__ == "__main__":
    main()
