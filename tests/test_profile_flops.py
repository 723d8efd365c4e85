"""FLOP counting (oapl_megatron.profile.flops) against a hand count and against torch's FlopCounterMode on real
transformers models (GQA, tied and untied embeddings, SwiGLU), forward and forward + backward."""

from __future__ import annotations

import pytest
import torch

from oapl_megatron.models.hf_config import ArchSpec, arch_from_hf
from oapl_megatron.profile.flops import attention_forward_flops, forward_flops, train_flops
from oapl_megatron.profile.presets import MODELS


def _arch(tied: bool, kv_heads: int) -> ArchSpec:
    return ArchSpec(family="qwen3", num_layers=2, hidden=8, ffn_hidden=12, heads=2, kv_heads=kv_heads, head_dim=4,
                    vocab_size=10, rope_theta=1e6, rms_eps=1e-6, tie_word_embeddings=tied, qkv_bias=False,
                    qk_norm=True, max_position_embeddings=16)


def test_hand_count_gqa_tied():
    # per layer: q 8·(2·4)=64, k 8·4=32, v 32, o 8·8=64, gate+up+down 3·8·12=288 → 480 weights in matmuls
    # dense forward per token: 2·(2 layers · 480 + LM head 8·10) = 2080
    # causal attention over S=3: (query,key) pairs 1+2+3 = 6; per head per layer 2·4·6 (QKᵀ) + 2·4·6 (AV) = 96
    #   × 2 heads × 2 layers = 384
    a = _arch(tied=True, kv_heads=1)
    assert attention_forward_flops(a, 3) == 384
    assert forward_flops(a, [3]) == 2080 * 3 + 384
    assert train_flops(a, [3]) == 3 * (2080 * 3 + 384)


def test_hand_count_mha_untied_two_sequences():
    # kv_heads = heads = 2: k and v are 8·8 each → per layer 64 + 64 + 64 + 64 + 288 = 544
    # dense per token 2·(2·544 + 80) = 2336; attention is 2·2·head_dim·pairs·heads·layers: S=1 (1 pair) → 64
    a = _arch(tied=False, kv_heads=2)
    att1 = 2 * 2 * 4 * 1 * 2 * 2
    att4 = 2 * 2 * 4 * 10 * 2 * 2  # S=4: pairs 1+2+3+4 = 10
    assert forward_flops(a, [1, 4]) == 2336 * 5 + att1 + att4
    # non-causal (Megatron's convention) counts the full square: 16 pairs at S=4
    assert attention_forward_flops(a, 4, causal=False) == 2 * 2 * 4 * 16 * 2 * 2


def test_tied_and_untied_cost_the_same_flops_not_params():
    t, u = _arch(tied=True, kv_heads=1), _arch(tied=False, kv_heads=1)
    assert forward_flops(t, [5, 7]) == forward_flops(u, [5, 7])
    assert u.num_params - t.num_params == 8 * 10


def test_presets_match_published_sizes():
    # the releases' own parameter counts (model cards): 4.0B, 8.2B, 14.8B, 32.8B
    for name, billions in (("qwen3-4b", 4.02), ("qwen3-8b", 8.19), ("qwen3-14b", 14.77), ("qwen3-32b", 32.76)):
        assert abs(MODELS[name].num_params / 1e9 - billions) < 0.01, name
    # ≈ 6·N FLOPs per token for a short sequence (attention negligible, embedding not a matmul)
    a = MODELS["qwen3-8b"]
    per_tok = train_flops(a, [1])
    emb = a.vocab_size * a.hidden
    assert abs(per_tok / (6 * (a.num_params - emb)) - 1) < 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen3_tied"])
def test_matches_flop_counter_on_transformers_models(family):
    """torch counts every matmul a real HF model runs (eager attention: the full S×S square, so causal=False)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hf_tiny import make_model

    model = make_model(family)
    model.config._attn_implementation = "eager"
    arch = arch_from_hf(model.config)
    lens = [5, 9]
    for s in lens:
        ids = torch.randint(0, arch.vocab_size, (1, s))
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                model(input_ids=ids)
        assert fwd.get_total_flops() == forward_flops(arch, [s], causal=False), (family, s)
        with FlopCounterMode(display=False) as both:
            model(input_ids=ids).logits.sum().backward()
        assert both.get_total_flops() == train_flops(arch, [s], causal=False), (family, s)
