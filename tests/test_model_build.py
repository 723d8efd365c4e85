"""Policy construction on CPU: HF config → ArchSpec → megatron-core GPTModel through the CPU compatibility layer.

Oracle: transformers models built from the same tiny configs (``sum(p.numel())``, tied weight once). In-process
tests use a world of one (gloo, TP1PP1); the multi-rank test runs tests/workers/build_worker.py on 4 torchrun
ranks (TP2PP2 and TP1PP2 with VPP=2 in one world). Run: ``pytest tests/test_model_build.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from oapl_megatron.config.loader import ConfigError
from oapl_megatron.config.schema import FP8Config, ModelConfig, ParallelConfig
from oapl_megatron.models.hf_config import UnsupportedArchitectureError, arch_from_hf, make_vocab_padding
from oapl_megatron.parallel.bootstrap import ParallelContext

LOCAL = ModelConfig(transformer_impl="local")  # the names below are the local spec's
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def _hf_config(case: str, layers: int | None = None):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if layers is not None:
        return type(_hf_config(case))(**{**_hf_config(case).to_dict(), "num_hidden_layers": layers,
                                         "layer_types": None})

    if case == "llama_untied":
        return LlamaConfig(**TINY, attention_bias=False, tie_word_embeddings=False)
    if case == "qwen2_tied":
        return Qwen2Config(**TINY, tie_word_embeddings=True)
    if case == "qwen3_tied":  # head_dim 24 != hidden 64 / heads 4
        return Qwen3Config(**TINY, head_dim=24, tie_word_embeddings=True)
    if case == "qwen3_untied":
        return Qwen3Config(**{**TINY, "num_hidden_layers": 4}, head_dim=24, tie_word_embeddings=False)
    raise KeyError(case)


def _hf_numel(cfg) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.fixture(scope="module")
def world1():
    """A world of one (gloo, TP1PP1) for in-process builds; torn down after the module."""
    import torch.distributed as dist

    from oapl_megatron.parallel.bootstrap import init_distributed, shutdown

    assert not dist.is_initialized(), "another test left torch.distributed initialised"
    ctx = init_distributed(ParallelConfig(), seed=0)
    try:
        yield ctx
    finally:
        shutdown()


# ---------------------------------------------------------------------------------------------- in-process builds


@pytest.mark.parametrize("case", ["llama_untied", "qwen2_tied", "qwen3_tied", "qwen3_untied"])
def test_parameter_count_and_names_match_hf(world1, case):
    from oapl_megatron.models.builder import build_policy, count_parameters
    from oapl_megatron.models.mapping import megatron_names_in_order

    cfg = _hf_config(case)
    arch = arch_from_hf(cfg)
    chunks = build_policy(arch, LOCAL, world1)
    assert len(chunks) == 1
    expected = _hf_numel(cfg)
    assert count_parameters(chunks, world1) == expected
    assert arch.num_params == expected
    # The mapping's names are the model's: at TP1·PP1 a tied model has no output_layer.weight parameter (the
    # mapping keeps it as a load-only rule for the last stage's copy at PP > 1).
    expected = [n for n in megatron_names_in_order(arch, "local")
                if not (arch.tie_word_embeddings and n == "output_layer.weight")]
    names = [n for n, _ in chunks[0].named_parameters()]
    assert len(names) == len(set(names)) and sorted(names) == sorted(expected)


def test_arch_fields_from_hf(world1):
    arch = arch_from_hf(_hf_config("qwen3_tied"))
    assert (arch.family, arch.head_dim, arch.kv_heads, arch.qk_norm, arch.qkv_bias) == ("qwen3", 24, 2, True, False)
    assert arch_from_hf(_hf_config("qwen2_tied")).qkv_bias
    assert not arch_from_hf(_hf_config("llama_untied")).tie_word_embeddings


def test_forward_backward_through_schedule_without_mask(world1):
    """attention_mask=None exercises megatron's cuda causal-mask site through the shim; torch stays unpatched."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from oapl_megatron.models.builder import build_policy

    cuda_method, type_method = torch.Tensor.cuda, torch.Tensor.type
    arch = arch_from_hf(_hf_config("qwen3_tied"))
    # Dropout forks megatron's "CUDA" RNG tracker, which the shim serves from the CPU generator.
    model_cfg = ModelConfig(transformer_impl="local", hidden_dropout=0.1, attention_dropout=0.1)
    (model,) = build_policy(arch, model_cfg, world1)
    ids = torch.randint(0, arch.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8).expand(2, 8)

    def forward_step(data_iterator, m):
        batch = next(data_iterator)
        logits = m(batch[:, :-1], pos, None)  # [B, S, V]

        def loss_func(out):
            loss = vocab_parallel_cross_entropy(out.float().clone(), batch[:, 1:]).mean()
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([ids, ids]), model=[model], num_microbatches=2,
        seq_length=8, micro_batch_size=2, forward_only=False,
    )
    assert len(losses) == 2 and all(math.isfinite(float(d["loss"])) for d in losses)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # The shim is local to megatron modules: torch itself is untouched.
    assert torch.Tensor.cuda is cuda_method and torch.Tensor.type is type_method
    assert torch.tensor([1.0]).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_causal_mask_none_equals_explicit_mask(world1):
    from oapl_megatron.models.builder import build_policy

    arch = arch_from_hf(_hf_config("llama_untied"))
    (model,) = build_policy(arch, LOCAL, world1)
    ids = torch.randint(0, arch.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(7).expand(2, 7)
    mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)[None, None]  # True = masked, [1, 1, S, S]
    with torch.no_grad():
        a, b = model(ids, pos, None), model(ids, pos, mask)
        # Causality: changing the last token must not change earlier logits.
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] + 1) % arch.vocab_size
        c = model(ids2, pos, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[:, :-1], c[:, :-1], rtol=0, atol=0)
    assert not torch.equal(a[:, -1], c[:, -1])


# -------------------------------------------------------------------------------------------- compat layer checks


def test_cpu_compat_is_idempotent_and_local(world1):
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.utils as mutils

    from oapl_megatron.parallel.cpu_compat import PATCHED_MODULES, apply_cpu_compat, is_applied

    assert is_applied()
    proxy = mutils.torch
    assert proxy is not torch and apply_cpu_compat() is True and mutils.torch is proxy
    for name in PATCHED_MODULES:
        import importlib

        assert importlib.import_module(name).torch is proxy, name
    # The CUDA RNG API inside megatron is the CPU generator.
    state = torch.get_rng_state()
    assert torch.equal(mrandom.torch.cuda.get_rng_state(), state)
    assert mrandom.torch.zeros(2, device="cuda").device.type == "cpu"


@pytest.mark.parametrize("params_dtype, distributed", [("float32", True), ("bfloat16", False)])
def test_ddp_and_optimizer_step_through_shim(world1, params_dtype, distributed):
    """The optimizer-side sites: grad buffers, cuda scalars, ``param.type()`` dispatch, grad clipping."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.transformer.module import Float16Module

    from oapl_megatron.models.builder import build_policy

    arch = arch_from_hf(_hf_config("qwen2_tied"))
    (model,) = build_policy(arch, ModelConfig(transformer_impl="local", params_dtype=params_dtype), world1)
    config = model.config
    if params_dtype == "bfloat16":
        model = Float16Module(config, model)  # as the trainer does for bf16 params (fp32 main params in the optimizer)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=distributed, grad_reduce_in_fp32=True), model
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, bf16=params_dtype == "bfloat16",
                        use_distributed_optimizer=distributed, clip_grad=1.0),
        [ddp],
    )
    ids = torch.randint(0, arch.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(8).expand(2, 8)
    losses = []
    for _ in range(3):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        logits = ddp(ids[:, :-1], pos, None)
        loss = vocab_parallel_cross_entropy(logits.float().clone(), ids[:, 1:]).mean()
        loss.backward()
        ddp.finish_grad_sync()
        ok, grad_norm, _ = opt.step()
        assert ok and math.isfinite(grad_norm) and grad_norm > 0
        losses.append(float(loss))
    assert losses[2] < losses[0]


def test_unknown_megatron_version_is_refused(monkeypatch):
    import megatron.core

    from oapl_megatron.parallel.cpu_compat import apply_cpu_compat, check_megatron_version

    check_megatron_version("0.16.1")
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.17\.0 is installed"):
        check_megatron_version("0.17.0")
    monkeypatch.setattr(megatron.core, "__version__", "0.15.3")
    with pytest.raises(RuntimeError, match=r"written for megatron-core 0\.16\.1 and megatron-core 0\.15\.3"):
        apply_cpu_compat()


def test_checkpoint_writer_manager_is_stopped(world1, tmp_path, monkeypatch):
    """dist_checkpointing's first save starts a Manager process (megatron's private ``_results_queue``);
    cpu_compat stops it (oapl-convert's spawned ranks do before ``os._exit``) and resets the global."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from oapl_megatron.models.builder import build_policy
    from oapl_megatron.parallel.cpu_compat import stop_checkpoint_writer_manager

    (model,) = build_policy(arch_from_hf(_hf_config("qwen2_tied")), LOCAL, world1)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    assert fa._results_queue is not None
    process = fa._results_queue._manager._process
    assert process.is_alive()
    assert stop_checkpoint_writer_manager() is True
    process.join(timeout=30)
    assert not process.is_alive() and fa._results_queue is None
    assert stop_checkpoint_writer_manager() is False  # nothing to stop
    # another megatron-core version: the private global is not touched blindly
    import megatron.core

    monkeypatch.setattr(fa, "_results_queue", object())
    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.17\.0 is installed"):
        stop_checkpoint_writer_manager()


# ------------------------------------------------------------------------------------------------ config errors


def test_fp8_and_te_without_transformer_engine_name_the_field(world1):
    from oapl_megatron.models.builder import build_policy

    arch = arch_from_hf(_hf_config("llama_untied"))
    with pytest.raises(ConfigError, match=r"model\.fp8\.enabled"):
        build_policy(arch, ModelConfig(fp8=FP8Config(enabled=True)), world1)
    with pytest.raises(ConfigError, match=r"model\.transformer_impl"):
        build_policy(arch, ModelConfig(transformer_impl="transformer_engine"), world1)


def test_fp8_fields_reach_transformer_config():
    from oapl_megatron.models.builder import make_transformer_config

    arch = arch_from_hf(_hf_config("qwen3_untied"))
    cfg = ModelConfig(transformer_impl="transformer_engine", recompute_activations=True,
                      fp8=FP8Config(enabled=True, recipe="tensorwise", amax_history_len=16,
                                    first_last_layers_bf16=True, num_layers_at_end_in_bf16=2))
    tc = make_transformer_config(arch, cfg, _ctx(), "transformer_engine")  # config only: no TE needed
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == ("hybrid", "tensorwise", 16,
                                                                                          "max")
    assert (tc.first_last_layers_bf16, tc.num_layers_at_start_in_bf16, tc.num_layers_at_end_in_bf16) == (True, 1, 2)
    assert tc.recompute_granularity == "full" and tc.num_query_groups == 2 and tc.kv_channels == 24
    # The GPU settings (bf16, fused bias-SwiGLU / bias-dropout-add, device init) pass megatron's own validation.
    gpu_ctx = dataclasses.replace(_ctx(), device=torch.device("cuda", 0), backend="nccl")
    tc = make_transformer_config(arch, ModelConfig(params_dtype="bfloat16"), gpu_ctx, "local")
    assert tc.bf16 and tc.params_dtype == torch.bfloat16 and tc.bias_activation_fusion and not tc.use_cpu_initialization
    # megatron rejects bf16 first/last layers with delayed scaling; the config says so when it is loaded.
    with pytest.raises(ValueError, match=r"model\.fp8\.first_last_layers_bf16=true .* model\.fp8\.recipe=delayed"):
        FP8Config(enabled=True, first_last_layers_bf16=True)


def test_world_size_not_divisible_names_parallel_tp(world1):
    from oapl_megatron.parallel.bootstrap import init_distributed, set_model_parallel

    with pytest.raises(ConfigError, match=r"world size 1 is not divisible by parallel\.tp \* parallel\.pp"):
        init_distributed(ParallelConfig(tp=2), seed=0)
    with pytest.raises(ConfigError, match=r"parallel\.tp"):
        set_model_parallel(tp=1, pp=3)


def _ctx(tp=1, pp=1, vpp=None) -> ParallelContext:
    world = tp * pp
    return ParallelContext(world_size=world, rank=0, local_rank=0, tp=tp, pp=pp, dp=1, vpp=vpp, tp_rank=0,
                           pp_rank=0, dp_rank=0, device=torch.device("cpu"), backend="gloo")


def test_layout_checks_name_the_field():
    from oapl_megatron.models.builder import check_layout

    arch = arch_from_hf(_hf_config("qwen3_untied"))  # 4 layers, 4 heads, 2 kv heads
    check_layout(arch, tp=2, pp=2)
    with pytest.raises(ConfigError, match=r"num_hidden_layers=4 .*parallel\.pp \* \(parallel\.vpp or 1\)"):
        check_layout(arch, tp=1, pp=2, vpp=4)
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 is not divisible by parallel\.tp=8"):
        check_layout(arch, tp=8, pp=1)
    with pytest.raises(ConfigError, match=r"num_key_value_heads=2 is not divisible by parallel\.tp=4"):
        check_layout(arch, tp=4, pp=1)
    # the same check names oapl-convert's flags
    with pytest.raises(ConfigError, match=r"num_hidden_layers=4 is not divisible by --pp 3"):
        check_layout(arch, tp=1, pp=3, flags=True)
    with pytest.raises(ConfigError, match=r"--tp 0 must be >= 1"):
        check_layout(arch, tp=0, pp=1, flags=True)
    assert _ctx(pp=2, vpp=2).is_first_stage(0) and not _ctx(pp=2, vpp=2).is_last_stage(1)


# ---------------------------------------------------------------------------------------------- hf_config (pure)


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"model_type": "qwen3_moe"}, "model_type"),
        ({"num_experts": 8}, "num_experts"),
        ({"use_sliding_window": True, "sliding_window": 128}, "use_sliding_window"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_parameters.rope_type"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 4096}},
         "rope_parameters.original_max_position_embeddings"),
        ({"attention_bias": True}, "attention_bias"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_unsupported_config_names_file_and_field(tmp_path, patch, field):
    data = _hf_config("qwen3_tied").to_dict()
    data.update(patch)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UnsupportedArchitectureError) as info:
        arch_from_hf(tmp_path)
    assert str(path) in str(info.value) and f"'{field}'" in str(info.value)


def test_legacy_rope_layout_and_llama3_scaling():
    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 50}
    arch = arch_from_hf({**base, "rope_theta": 5e5})  # transformers-4 layout, no rope_scaling
    assert (arch.rope_theta, arch.rope_scaling_factor, arch.kv_heads, arch.head_dim) == (5e5, None, 4, 16)
    scaled = arch_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert scaled.rope_scaling_factor == 32.0
    with pytest.raises(UnsupportedArchitectureError, match=r"<config dict>: field 'vocab_size'"):
        arch_from_hf({k: v for k, v in base.items() if k != "vocab_size"})


def test_make_vocab_padding():
    assert make_vocab_padding(97, 1) == 97
    assert make_vocab_padding(97, 2) == 98
    assert make_vocab_padding(96, 4) == 96
    assert make_vocab_padding(151936, 8) == 151936
    assert make_vocab_padding(151665, 8) == 151672
    with pytest.raises(ValueError):
        make_vocab_padding(0, 2)


# ------------------------------------------------------------------------------------------------------ multi-rank


@pytest.mark.slow
def test_multi_rank_tp2pp2_and_vpp(tmp_path):
    from tests.dist_util import REPO, run_torchrun

    args = []
    for case in ("qwen3_untied", "qwen3_tied"):  # first one runs the schedule
        cfg = _hf_config(case, layers=4)
        path = tmp_path / f"{case}.json"
        path.write_text(json.dumps(cfg.to_dict()))
        args += [str(path), str(_hf_numel(cfg))]
    out = tmp_path / "out"
    out.mkdir()
    # TORCHDYNAMO_DISABLE=0: the CPU build must not reach any torch.compile'd megatron kernel.
    run_torchrun(REPO / "tests" / "workers" / "build_worker.py", 4, out, args, timeout=240,
                 env={"TORCHDYNAMO_DISABLE": "0"})

    ranks = [json.loads((out / f"rank{r}.json").read_text())["results"] for r in range(4)]
    for results in ranks:
        assert len(results) == 4
        for rec in results:
            assert rec["count"] == rec["expected"], rec
            assert rec["n_chunks"] == (2 if rec["layout"] == [1, 2, 2] else 1)
    for layout in ([2, 2, None], [1, 2, 2]):
        sched = [rec for results in ranks for rec in results if rec["layout"] == layout and "losses" in rec]
        assert len(sched) == 4
        last = [rec for rec in sched if rec["pp_rank"] == 1]
        assert all(len(r["losses"]) == 4 and r["losses_finite"] for r in last)
        # Vocab-parallel loss is identical on the TP ranks (TP2PP2) of the last stage.
        if layout == [2, 2, None]:
            assert last[0]["losses"] == last[1]["losses"]
        assert all(r["grads_finite"] and r["n_grads"] > 0 for r in sched)


@pytest.mark.gpu
def test_gpu_bf16_local_build_and_forward(world1):
    """On a GPU: bf16 params on cuda (local spec), the count still matches HF and a forward is finite."""
    from oapl_megatron.models.builder import build_policy, count_parameters

    cfg = _hf_config("qwen3_tied")
    arch = arch_from_hf(cfg)
    (model,) = build_policy(arch, LOCAL, world1)
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in model.parameters())
    assert count_parameters([model], world1) == _hf_numel(cfg)
    ids = torch.randint(0, arch.vocab_size, (2, 8), device=world1.device)
    pos = torch.arange(8, device=world1.device).expand(2, 8)
    with torch.no_grad():
        logits = model(ids, pos, None)
    assert logits.shape == (2, 8, arch.vocab_size) and torch.isfinite(logits.float()).all()
