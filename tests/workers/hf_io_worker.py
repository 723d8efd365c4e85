"""Multi-rank worker for tests/test_hf_io.py: load HF safetensors into sharded Megatron models and gather them back.

Run by ``tests.dist_util.run_torchrun(..., nproc=4)`` with arguments ``NAME=HF_DIR ...``. For each layout (TP2·PP2,
then TP1·PP2·VPP2 re-gridded with ``set_model_parallel``, where the world holds two data-parallel replicas) and each
model it: builds the policy, ``load_hf_weights`` from the directory, runs ``iter_hf_weights`` to a destination rank
(rank 0, and rank 3 — last stage, tp rank 1 — for TP2·PP2) and checks bit-equality with the file there, and runs a
forward-only pipeline schedule whose full-vocabulary logits the last stage writes to
``$OAPL_TEST_OUT/logits_{layout}_{NAME}.pt``. At TP2·PP2 it also exports the model with ``write_hf_checkpoint``
and checks the file bit-equal on rank 0. Gathers and exports run under ``collective_device_guard`` (every tensor a
collective gets must be placed on the group's device explicitly: the NCCL bug class, caught on gloo).
Per-rank results go to ``$OAPL_TEST_OUT/rank{R}.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from collective_guard import collective_device_guard  # noqa: E402


def forward_logits(chunks, ctx, ids: torch.Tensor, n_micro: int = 2):
    """Forward-only pipeline schedule; on the last stage returns full-vocabulary logits [B, S, V_pad], else None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs, seq = ids.shape[0] // n_micro, ids.shape[1]
    batches = [ids[i * mbs:(i + 1) * mbs] for i in range(n_micro)]
    pos = torch.arange(seq).expand(mbs, seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    outputs = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch, pos, mask)

        def loss_func(output):
            outputs.append(output.detach().clone())  # [mbs, S, V_pad/tp]
            return output.sum() * 0, {}

        return out, loss_func

    data = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data,
                                model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=n_micro,
                                seq_length=seq, micro_batch_size=mbs, forward_only=True)
    if not outputs:
        return None
    local = torch.cat(outputs, dim=0)
    if ctx.tp > 1:
        parts = [torch.empty_like(local) for _ in range(ctx.tp)]
        torch.distributed.all_gather(parts, local.contiguous(), group=ctx.tp_group)
        local = torch.cat(parts, dim=-1)
    return local


def main() -> None:
    from safetensors.torch import load_file

    from oapl_megatron.config.schema import ModelConfig, ParallelConfig
    from oapl_megatron.models.builder import build_policy
    from oapl_megatron.models.hf_config import arch_from_hf
    from oapl_megatron.models.convert import write_hf_checkpoint
    from oapl_megatron.models.hf_io import gather_hf_weights, load_hf_weights
    from oapl_megatron.parallel.bootstrap import init_distributed, set_model_parallel, shutdown

    out_dir = os.environ["OAPL_TEST_OUT"]
    models = dict(a.split("=", 1) for a in sys.argv[1:])
    ctx = init_distributed(ParallelConfig(tp=2, pp=2, timeout_s=120), seed=0)
    result: dict = {"rank": ctx.rank, "checks": {}}
    ids = torch.randint(0, 101, (4, 12), generator=torch.Generator().manual_seed(7))
    for layout, (tp, pp, vpp), dsts in [("tp2pp2", (2, 2, None), [0, 3]), ("tp1pp2vpp2", (1, 2, 2), [0])]:
        if (ctx.tp, ctx.pp, ctx.vpp) != (tp, pp, vpp):
            ctx = set_model_parallel(tp, pp, vpp)
        for name, hf_dir in models.items():
            arch = arch_from_hf(hf_dir)
            chunks = build_policy(arch, ModelConfig(transformer_impl="local", params_dtype="float32"), ctx)
            load_hf_weights(chunks, ctx, arch, hf_dir)
            ref = load_file(os.path.join(hf_dir, "model.safetensors"))
            for dst in dsts:
                with collective_device_guard(ctx.device):  # every gathered tensor on the group's device
                    metas, tensors = gather_hf_weights(chunks, ctx, arch, dst_rank=dst)
                    got = {n: t.clone() for n, t in tensors}
                key = f"{layout}/{name}/dst{dst}"
                if ctx.rank == dst:
                    want = dict(ref)
                    if arch.tie_word_embeddings:
                        want["lm_head.weight"] = ref["model.embed_tokens.weight"]
                    result["checks"][key] = {
                        "names_equal": sorted(got) == sorted(want),
                        "bit_equal": [n for n in want if n not in got or not torch.equal(got[n], want[n])] == [],
                        "n": len(got),
                        # the metadata announced before the gather equals what the gather yielded, in order
                        "metas_match": metas == [(n, t.dtype, tuple(t.shape)) for n, t in got.items()],
                    }
                else:
                    result["checks"][key] = {"yielded": len(got)}
            if layout == "tp2pp2":  # HF export across stages, under the same guard
                export = os.path.join(out_dir, f"export_{name}")
                with collective_device_guard(ctx.device):
                    write_hf_checkpoint(chunks, ctx, arch, export, side_files_dir=hf_dir, dtype="float32")
                if ctx.rank == 0:
                    back = load_file(os.path.join(export, "model.safetensors"))
                    result["checks"][f"export/{name}"] = {
                        "bit_equal": sorted(back) == sorted(ref) and all(torch.equal(back[n], ref[n]) for n in ref)}
            logits = forward_logits(chunks, ctx, ids)
            if logits is not None and ctx.tp_rank == 0 and ctx.dp_rank == 0:
                torch.save({"ids": ids, "logits": logits}, os.path.join(out_dir, f"logits_{layout}_{name}.pt"))
    with open(os.path.join(out_dir, f"rank{ctx.rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown()


if __name__ == "__main__":
    main()
