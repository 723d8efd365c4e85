"""HF ↔ Megatron loading and gathering (oapl_megatron.models.hf_io) on real megatron-core models, with transformers
as the oracle: tensors come back bit-identical and the Megatron forward gives the transformers logits.

In-process tests run at TP1·PP1 (world of one); the slow test runs 4 gloo ranks (TP2·PP2 and TP1·PP2·VPP2).
Tolerance for logits: 1e-4 absolute in fp32 (measured ≈2e-7: same math, different kernel order).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny  # noqa: E402
from dist_util import run_torchrun  # noqa: E402

LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def ctx():
    from oapl_megatron.config.schema import ParallelConfig
    from oapl_megatron.parallel.bootstrap import init_distributed, shutdown

    c = init_distributed(ParallelConfig(), seed=0)
    yield c
    shutdown()


def _build(arch, ctx):
    from oapl_megatron.config.schema import ModelConfig
    from oapl_megatron.models.builder import build_policy

    return build_policy(arch, ModelConfig(transformer_impl="local", params_dtype="float32"), ctx)


class _Wrapper(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


def _megatron_logits(chunk, ids):
    seq = ids.shape[1]
    pos = torch.arange(seq).expand(ids.shape[0], seq)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        return chunk(ids, pos, mask)  # [B, S, V_pad]


@pytest.mark.parametrize("family", list(hf_tiny.FAMILIES))
def test_tp1_load_gather_and_logits(ctx, family):
    from oapl_megatron.models.hf_config import arch_from_hf
    from oapl_megatron.models.hf_io import gather_hf_weights, iter_hf_weights, load_hf_weights

    model = hf_tiny.make_model(family)
    arch = arch_from_hf(model.config)
    chunks = _build(arch, ctx)
    sd = model.state_dict()
    load_hf_weights(chunks, ctx, arch, sd)
    back = {n: t.clone() for n, t in iter_hf_weights(chunks, ctx, arch)}
    # state_dict() of a tied transformers model holds lm_head.weight too: iter emits it (vLLM needs it).
    assert sorted(back) == sorted(sd)
    for n, t in sd.items():
        assert torch.equal(back[n], t), n
    untied_view = dict(iter_hf_weights(chunks, ctx, arch, include_tied_lm_head=False))
    assert ("lm_head.weight" in untied_view) == (not arch.tie_word_embeddings)
    # the metadata announced before any tensor is gathered is exactly what the gather yields (names, order,
    # dtypes, shapes): a weight sync plans its buckets from it and streams
    for tied_head in (True, False):
        metas, tensors = gather_hf_weights(chunks, ctx, arch, include_tied_lm_head=tied_head)
        assert metas == [(n, t.dtype, tuple(t.shape)) for n, t in tensors]
    # Wrapped chunks (megatron DDP / Float16Module expose .module) and a custom tensor per parameter (the lead's
    # gradient-parity test gathers p.main_grad this way).
    wrapped = [_Wrapper(_Wrapper(c)) for c in chunks]
    doubled = dict(iter_hf_weights(wrapped, ctx, arch, tensor_of=lambda n, p: p.detach() * 2))
    for n, t in sd.items():
        assert torch.equal(doubled[n], 2 * t), n

    ids = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    err = (_megatron_logits(chunks[0], ids)[..., : arch.vocab_size] - hf_tiny.hf_logits(model, ids)).abs().max()
    assert err < LOGIT_TOL, f"{family}: max |logit diff| {err}"


def test_load_from_sharded_safetensors_dir(ctx, tmp_path):
    """A multi-file checkpoint (model.safetensors.index.json) loads the same as the state dict."""
    from oapl_megatron.models.hf_config import arch_from_hf
    from oapl_megatron.models.hf_io import iter_hf_weights, load_hf_weights

    model = hf_tiny.save_model("qwen2_tied", tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    arch = arch_from_hf(tmp_path)
    chunks = _build(arch, ctx)
    load_hf_weights(chunks, ctx, arch, tmp_path)
    back = dict(iter_hf_weights(chunks, ctx, arch))
    for n, t in model.state_dict().items():
        assert torch.equal(back[n], t), n


def test_load_errors_name_tensor_and_file(ctx, tmp_path):
    from oapl_megatron.models.hf_config import arch_from_hf
    from oapl_megatron.models.hf_io import CheckpointFileError, load_hf_weights
    from oapl_megatron.models.mapping import MappingError

    hf_tiny.save_model("llama", tmp_path / "ok", max_shard_size="20KB")
    arch = arch_from_hf(tmp_path / "ok")
    chunks = _build(arch, ctx)
    # Wrong shape in the state dict
    sd = hf_tiny.make_model("llama").state_dict()
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(47, 32)
    with pytest.raises(MappingError, match=r"model.layers.1.mlp.up_proj.weight: shape \(47, 32\)"):
        load_hf_weights(chunks, ctx, arch, sd)
    # A shard listed in the index is gone
    index = json.loads((tmp_path / "ok" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "ok" / victim).unlink()
    with pytest.raises(CheckpointFileError, match=victim):
        load_hf_weights(chunks, ctx, arch, tmp_path / "ok")


@pytest.mark.slow
def test_tp2pp2_and_vpp_load_gather_logits(tmp_path):
    models = {}
    for family in hf_tiny.FAMILIES:
        models[family] = hf_tiny.save_model(family, tmp_path / family)
    out = tmp_path / "out"
    out.mkdir()
    run_torchrun(Path(__file__).parent / "workers" / "hf_io_worker.py", 4, out,
                 [f"{f}={tmp_path / f}" for f in models], timeout=300)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    for layout, dsts in [("tp2pp2", [0, 3]), ("tp1pp2vpp2", [0])]:
        for family, model in models.items():
            for dst in dsts:
                key = f"{layout}/{family}/dst{dst}"
                check = ranks[dst]["checks"][key]
                assert check["names_equal"] and check["bit_equal"] and check["metas_match"], (key, check)
                assert all(ranks[r]["checks"][key] == {"yielded": 0} for r in range(4) if r != dst), key
            if layout == "tp2pp2":
                assert ranks[0]["checks"][f"export/{family}"]["bit_equal"], family
            saved = torch.load(out / f"logits_{layout}_{family}.pt")
            ref = hf_tiny.hf_logits(model, saved["ids"])
            err = (saved["logits"][..., :101] - ref).abs().max()
            assert err < LOGIT_TOL, f"{layout}/{family}: max |logit diff| {err}"
