"""Multi-rank worker for tests/test_model_build.py: build the policy on several layouts of one 4-rank world.

Run by ``tests.dist_util.run_torchrun(..., nproc=4)`` with arguments ``CONFIG_JSON EXPECTED_COUNT ...`` (pairs of
an HF config.json path and the HF parameter count). For each layout (TP2PP2, then TP1PP2 with VPP=2, re-gridded
with ``set_model_parallel``) and each config it records ``count_parameters`` and, for the first config, the loss of
one forward/backward through ``get_forward_backward_func()``. Writes ``$OAPL_TEST_OUT/rank{R}.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch


def _run_schedule(chunks, ctx, vocab_size: int, seq: int = 8, mbs: int = 2, n_micro: int = 4) -> dict:
    """One forward/backward pass of ``n_micro`` micro-batches; returns the last stage's losses (else empty)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(123)  # the same batches on every rank
    batches = []
    for _ in range(n_micro):
        ids = torch.randint(0, vocab_size, (mbs, seq + 1), generator=gen)
        batches.append({"ids": ids[:, :-1], "labels": ids[:, 1:]})
    pos = torch.arange(seq).expand(mbs, seq)
    # Explicit causal mask (True = masked), broadcast over batch and heads: [1, 1, S, S].
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch["ids"], pos, mask)  # last stage: [B, S, V_pad/tp]; other stages: hidden states

        def loss_func(output):
            # vocab_parallel_cross_entropy overwrites fp32 logits in place and wants [S, B, V/tp] or [B, S, V/tp].
            per_token = vocab_parallel_cross_entropy(output.float().clone(), batch["labels"])  # [B, S]
            loss = per_token.mean()
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    data = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=n_micro,
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=False,
    )
    grads_finite = all(
        p.grad is None or bool(torch.isfinite(p.grad).all()) for m in chunks for p in m.parameters()
    )
    n_grads = sum(p.grad is not None for m in chunks for p in m.parameters())
    return {"losses": [float(d["loss"]) for d in losses], "grads_finite": grads_finite, "n_grads": n_grads}


def main() -> None:
    from oapl_megatron.config.schema import ModelConfig, ParallelConfig
    from oapl_megatron.models.builder import build_policy, count_parameters
    from oapl_megatron.models.hf_config import arch_from_hf
    from oapl_megatron.parallel.bootstrap import init_distributed, set_model_parallel, shutdown

    pairs = sys.argv[1:]
    configs = [(pairs[i], int(pairs[i + 1])) for i in range(0, len(pairs), 2)]
    out_dir = os.environ["OAPL_TEST_OUT"]

    ctx = init_distributed(ParallelConfig(tp=2, pp=2, timeout_s=120), seed=7)
    results = []
    for layout in [(2, 2, None), (1, 2, 2)]:
        if (ctx.tp, ctx.pp, ctx.vpp) != layout:
            ctx = set_model_parallel(*layout)
        for k, (path, expected) in enumerate(configs):
            arch = arch_from_hf(path)
            t0 = time.time()
            chunks = build_policy(arch, ModelConfig(), ctx)
            rec = {
                "layout": list(layout), "config": path, "expected": expected,
                "count": count_parameters(chunks, ctx), "n_chunks": len(chunks),
                "build_s": round(time.time() - t0, 3), "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank,
                "dp_rank": ctx.dp_rank,
            }
            if k == 0:
                sched = _run_schedule(chunks, ctx, arch.vocab_size)
                rec.update(sched)
                rec["losses_finite"] = all(math.isfinite(x) for x in sched["losses"])
            results.append(rec)
            del chunks

    with open(os.path.join(out_dir, f"rank{ctx.rank}.json"), "w") as f:
        json.dump({"rank": ctx.rank, "results": results}, f)
    shutdown()


if __name__ == "__main__":
    main()
