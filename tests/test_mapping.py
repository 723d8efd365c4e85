"""Pure tests of the HF ↔ Megatron mapping (oapl_megatron.models.mapping): TP split/merge round trips, the fused
QKV and gate/up layouts against hand-built references, vocab padding, and the (virtual) pipeline layer placement."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from oapl_megatron.models import mapping as M


@dataclass(frozen=True)
class Arch:
    family: str = "llama"
    num_layers: int = 4
    hidden: int = 32
    ffn_hidden: int = 48
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 8
    vocab_size: int = 103  # deliberately not a multiple of any tp
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False


ARCHS = {
    "llama": Arch(),
    "qwen2_tied_bias": Arch(family="qwen2", tie_word_embeddings=True, qkv_bias=True),
    "qwen3_tied_norm": Arch(family="qwen3", tie_word_embeddings=True, qk_norm=True, head_dim=16),
    "qwen3_untied_mqa": Arch(family="qwen3", qk_norm=True, kv_heads=1),
}


def random_hf(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in M.hf_shapes(arch).items()}


def padded(vocab, tp, multiple=8):
    m = multiple * tp
    return (vocab + m - 1) // m * m


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("arch_name", list(ARCHS))
@pytest.mark.parametrize("spec", ["local", "te"])
def test_round_trip_is_bit_exact(arch_name, tp, spec):
    arch = ARCHS[arch_name]
    if arch.kv_heads < tp and arch.kv_heads * (arch.heads // arch.kv_heads + 2) * arch.head_dim % tp:
        pytest.skip("fused qkv rows do not split")
    hf = random_hf(arch)
    pv = padded(arch.vocab_size, tp)
    back: dict[str, torch.Tensor] = {}
    kinds = set()
    for name in M.megatron_names_in_order(arch, spec):
        rule, _ = M.find_rule(arch, name, spec)
        shards = [M.hf_to_megatron_shard(arch, hf, name, r, tp, pv, spec).clone() for r in range(tp)]
        assert len({tuple(s.shape) for s in shards}) == 1, name
        kinds.add(rule.kind)
        out = M.megatron_shards_to_hf(arch, name, shards, pv, spec)
        assert not (set(out) & set(back)), f"{name} emits a name twice"
        back.update(out)
    assert list(back) == M.hf_names_in_order(arch)
    for n, t in hf.items():
        assert torch.equal(back[n], t), n
    assert kinds >= {M.Kind.REPLICATED, M.Kind.ROW, M.Kind.VOCAB, M.Kind.QKV, M.Kind.GATE_UP}


def test_qkv_shard_layout_matches_megatron_grouping():
    """Shard r of linear_qkv holds kv_heads/tp whole groups, each [q heads of the group; k; v] (attention.py)."""
    arch = Arch(heads=4, kv_heads=2, head_dim=2, hidden=3)
    q = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 4 heads x 2 rows
    k = 100 + torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
    v = 200 + torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
    hf = {"model.layers.0.self_attn.q_proj.weight": q, "model.layers.0.self_attn.k_proj.weight": k,
          "model.layers.0.self_attn.v_proj.weight": v}
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    s1 = M.hf_to_megatron_shard(arch, hf, name, 1, 2, 8)
    # group 1 = q heads 2,3 (rows 4..7), k head 1 (rows 2..3), v head 1 (rows 2..3)
    assert torch.equal(s1, torch.cat([q[4:8], k[2:4], v[2:4]]))
    # the view megatron uses on a local shard: [ng/tp, (np/ng + 2) * hn, in]
    local = s1.view(1, (2 + 2) * 2, 3)
    assert torch.equal(local[0, 4:6], k[2:4])


def test_gate_up_shard_layout():
    arch = Arch(ffn_hidden=4, hidden=2)
    gate = torch.arange(8.0).reshape(4, 2)
    up = 10 + torch.arange(8.0).reshape(4, 2)
    hf = {"model.layers.1.mlp.gate_proj.weight": gate, "model.layers.1.mlp.up_proj.weight": up}
    s0 = M.hf_to_megatron_shard(arch, hf, "decoder.layers.1.mlp.linear_fc1.weight", 0, 2, 8)
    assert torch.equal(s0, torch.cat([gate[:2], up[:2]]))  # megatron: torch.chunk(x, 2)[0] is the gate


def test_vocab_padding_rows_are_zero_and_stripped():
    arch = Arch(vocab_size=5, hidden=2)
    emb = torch.randn(5, 2)
    hf = {"model.embed_tokens.weight": emb}
    shards = [M.hf_to_megatron_shard(arch, hf, "embedding.word_embeddings.weight", r, 2, 8) for r in range(2)]
    assert [tuple(s.shape) for s in shards] == [(4, 2), (4, 2)]
    assert torch.equal(shards[1][1:], torch.zeros(3, 2))
    assert torch.equal(M.megatron_shards_to_hf(arch, "embedding.word_embeddings.weight", shards, 8)
                       ["model.embed_tokens.weight"], emb)


def test_tied_output_layer_loads_from_embedding_and_is_not_emitted():
    arch = ARCHS["qwen2_tied_bias"]
    hf = random_hf(arch)
    assert "lm_head.weight" not in hf
    s = M.hf_to_megatron_shard(arch, hf, "output_layer.weight", 0, 1, 104)
    assert torch.equal(s[:103], hf["model.embed_tokens.weight"])
    assert M.megatron_shards_to_hf(arch, "output_layer.weight", [s], 104) == {}


def test_errors_name_the_problem():
    with pytest.raises(M.UnsupportedArchitectureError, match="'gemma'"):
        M.param_rules(replace(Arch(), family="gemma"))
    arch = Arch()
    hf = random_hf(arch)
    hf["model.layers.2.mlp.down_proj.weight"] = torch.zeros(32, 47)
    with pytest.raises(M.MappingError, match=r"model.layers.2.mlp.down_proj.weight: shape \(32, 47\)"):
        M.hf_to_megatron_shard(arch, hf, "decoder.layers.2.mlp.linear_fc2.weight", 0, 1, 104)
    del hf["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(M.MappingError, match="k_proj.weight.*missing"):
        M.hf_to_megatron_shard(arch, hf, "decoder.layers.1.self_attention.linear_qkv.weight", 0, 1, 104)
    with pytest.raises(M.MappingError, match="no HF mapping.*linear_qkv.bias"):
        M.find_rule(arch, "decoder.layers.0.self_attention.linear_qkv.bias")
    with pytest.raises(M.MappingError, match="layer 9"):
        M.find_rule(arch, "decoder.layers.9.mlp.linear_fc2.weight")
    with pytest.raises(M.MappingError, match="does not split over tp=5"):
        M.hf_to_megatron_shard(arch, random_hf(arch), "decoder.layers.0.mlp.linear_fc2.weight", 0, 5, 105)


def test_layer_placement_without_and_with_vpp():
    p = M.layer_placement(8, 2)
    assert [p.locate(i) for i in (0, 3, 4, 7)] == [(0, 0, 0), (0, 0, 3), (1, 0, 0), (1, 0, 3)]
    # interleaved: L=8, pp=2, vpp=2 → chunk 0: stage0 {0,1}, stage1 {2,3}; chunk 1: stage0 {4,5}, stage1 {6,7}
    v = M.layer_placement(8, 2, 2)
    assert list(v.layers_of(0, 0)) == [0, 1] and list(v.layers_of(1, 0)) == [2, 3]
    assert list(v.layers_of(0, 1)) == [4, 5] and list(v.layers_of(1, 1)) == [6, 7]
    assert v.locate(5) == (0, 1, 1)
    assert v.is_first(0, 0) and v.is_last(1, 1) and not v.is_last(1, 0)
    for n_layers, pp, vpp in [(12, 3, 2), (16, 2, 4), (6, 3, None)]:
        pl = M.layer_placement(n_layers, pp, vpp)
        seen = sorted(pl.global_index(r, c, j) for r in range(pp) for c in range(vpp or 1) for j in range(pl.per_chunk))
        assert seen == list(range(n_layers))
        assert all(pl.global_index(*pl.locate(i)) == i for i in range(n_layers))
    assert v.to_global_name("decoder.layers.1.mlp.linear_fc2.weight", 1, 1) == "decoder.layers.7.mlp.linear_fc2.weight"
    assert v.to_local_name("decoder.layers.7.mlp.linear_fc2.weight") == ("decoder.layers.1.mlp.linear_fc2.weight",
                                                                          (1, 1))
    with pytest.raises(ValueError, match="does not split evenly"):
        M.layer_placement(6, 4)
