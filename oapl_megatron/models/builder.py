"""Build the policy as megatron-core ``GPTModel`` chunks from an :class:`ArchSpec`; the one place models are made.

One chunk per virtual-pipeline stage held by this rank (a list of one without VPP). On CPU the layers come from
megatron's local spec (plain torch modules) and weights are initialised on the host; on a GPU with Transformer
Engine installed the TE spec is used (required for FP8)::

    ctx = init_distributed(ParallelConfig(), seed=0)
    arch = arch_from_hf("/models/Qwen3-0.6B")
    chunks = build_policy(arch, ModelConfig(), ctx)          # list[GPTModel], len == ctx.vpp or 1
    n = count_parameters(chunks, ctx)                         # == the HF model's parameter count (collective)

The model is built with ``make_vocab_padding(arch.vocab_size, ctx.tp)`` vocabulary rows (see
:mod:`oapl_megatron.models.hf_config`). With ``bfloat16`` params the caller wraps each chunk in megatron's
``Float16Module`` (as megatron's own training loop does) before the DDP wrapper.

Every fused kernel that megatron-core compiles with ``torch.compile`` (bias-SwiGLU, bias-dropout-add, fused
cross-entropy) is turned off on CPU, so nothing here depends on ``TORCHDYNAMO_DISABLE``.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from oapl_megatron.config.loader import ConfigError
from oapl_megatron.config.schema import ModelConfig
from oapl_megatron.models.hf_config import ArchSpec, make_vocab_padding
from oapl_megatron.parallel.bootstrap import ParallelContext


def transformer_engine_available() -> bool:
    """Whether Transformer Engine imports (a half-installed TE raises more than ImportError, so catch all)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False
    return True


def resolve_transformer_impl(model_cfg: ModelConfig) -> str:
    """``local`` or ``transformer_engine`` for this machine; raise ConfigError naming the field when impossible."""
    has_cuda = torch.cuda.is_available()
    want_te = model_cfg.transformer_impl == "transformer_engine" or model_cfg.fp8.enabled
    if want_te and not (has_cuda and transformer_engine_available()):
        missing = "no CUDA device" if not has_cuda else "Transformer Engine is not importable"
        field = "model.fp8.enabled=true" if model_cfg.fp8.enabled else "model.transformer_impl=transformer_engine"
        raise ConfigError(
            f"{field} needs a CUDA GPU with Transformer Engine installed, and this machine has {missing}; "
            f"use model.fp8.enabled=false and model.transformer_impl=local (or auto)"
        )
    if model_cfg.transformer_impl == "auto":
        return "transformer_engine" if (has_cuda and transformer_engine_available()) else "local"
    return model_cfg.transformer_impl


def resolve_params_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """``auto`` → fp32 on CPU, bf16 on GPU."""
    if model_cfg.params_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[model_cfg.params_dtype]


def check_layout(arch: ArchSpec, tp: int, pp: int, vpp: int | None = None, flags: bool = False) -> None:
    """Raise ConfigError when ``arch`` cannot be split over ``tp`` × ``pp`` (× ``vpp``); the one layout check.

    The message names the config fields (``parallel.tp``, ...), or the command-line flags (``--tp``, ``--pp``)
    when ``flags`` (``oapl-convert``, which has no virtual pipeline: ``vpp`` is None there)."""

    def field(name: str, value) -> str:
        return f"--{name} {value}" if flags else f"parallel.{name}={value}"

    for name, value in (("tp", tp), ("pp", pp), ("vpp", vpp)):
        if value is not None and value < 1:
            raise ConfigError(f"{field(name, value)} must be >= 1")
    chunks = pp * (vpp or 1)
    if arch.num_layers % chunks != 0:
        split = field("pp", pp) if flags else f"parallel.pp * (parallel.vpp or 1) = {pp} * {vpp or 1}"
        raise ConfigError(
            f"num_hidden_layers={arch.num_layers} is not divisible by {split}; choose a pipeline split that "
            f"divides the layers evenly"
        )
    if arch.heads % tp != 0:
        raise ConfigError(
            f"num_attention_heads={arch.heads} is not divisible by {field('tp', tp)}; choose a tensor-parallel "
            f"size that divides the head count"
        )
    if arch.kv_heads % tp != 0:
        raise ConfigError(
            f"num_key_value_heads={arch.kv_heads} is not divisible by {field('tp', tp)}; choose a tensor-parallel "
            f"size that divides the key/value head count"
        )


def _fp8_fields(model_cfg: ModelConfig) -> dict:
    # Pairs megatron-core rejects (first_last_layers_bf16 with the delayed recipe) are refused by the config
    # validator (config/schema.py FP8Config) when the config is made.
    fp8 = model_cfg.fp8
    if not fp8.enabled:
        return {}
    return dict(
        fp8=fp8.format,
        fp8_recipe=fp8.recipe,
        fp8_amax_history_len=fp8.amax_history_len,
        fp8_amax_compute_algo=fp8.amax_compute_algo,
        first_last_layers_bf16=fp8.first_last_layers_bf16,
        num_layers_at_start_in_bf16=fp8.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=fp8.num_layers_at_end_in_bf16,
    )


def make_transformer_config(arch: ArchSpec, model_cfg: ModelConfig, ctx: ParallelContext, impl: str):
    """The megatron ``TransformerConfig`` of the policy (no model is built)."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = ctx.device.type == "cuda"
    dtype = resolve_params_dtype(model_cfg)
    recompute = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if model_cfg.recompute_activations
        else {}
    )
    return TransformerConfig(
        # grid
        tensor_model_parallel_size=ctx.tp,
        pipeline_model_parallel_size=ctx.pp,
        virtual_pipeline_model_parallel_size=ctx.vpp,
        sequence_parallel=False,  # not supported by the local spec on CPU
        # architecture
        num_layers=arch.num_layers,
        hidden_size=arch.hidden,
        ffn_hidden_size=arch.ffn_hidden,
        num_attention_heads=arch.heads,
        num_query_groups=arch.kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_eps,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        attention_softmax_in_fp32=True,
        # dtype and init
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        # implementation: fused (torch.compile'd / CUDA) kernels only on GPU
        transformer_impl=impl,
        attention_backend=AttnBackend.auto if impl == "transformer_engine" else AttnBackend.local,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=on_gpu and impl == "transformer_engine",
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        persist_layer_norm=False,
        **recompute,
        **_fp8_fields(model_cfg),
    )


def build_policy(arch: ArchSpec, model_cfg: ModelConfig, ctx: ParallelContext) -> list:
    """Build this rank's ``GPTModel`` chunks (``len == ctx.vpp or 1``), in virtual-stage order.

    Needs :func:`oapl_megatron.parallel.bootstrap.init_distributed` first. Collective for PP > 1 with tied
    embeddings (the last stage's copy of the embedding is all-reduced from the first stage inside megatron).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    impl = resolve_transformer_impl(model_cfg)
    check_layout(arch, ctx.tp, ctx.pp, ctx.vpp)
    config = make_transformer_config(arch, model_cfg, ctx, impl)
    if impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")

    chunks = []
    for i in range(ctx.num_chunks):
        vp_stage = i if ctx.vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=make_vocab_padding(arch.vocab_size, ctx.tp),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=ctx.is_first_stage(vp_stage),
            post_process=ctx.is_last_stage(vp_stage),
            parallel_output=True,  # logits stay vocab-sharded; the loss uses vocab_parallel_cross_entropy
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,
            vp_stage=vp_stage,
        )
        model.oapl_vocab_size = arch.vocab_size  # the unpadded size, for count_parameters and the weight mapping
        if ctx.device.type == "cuda":
            model.cuda(ctx.device)
        chunks.append(model)
    return chunks


def _local_count(model, ctx: ParallelContext) -> int:
    """Parameters of one chunk that this rank alone owns: TP duplicates, the tied output copy and vocab padding
    rows are excluded, so summing over one DP replica's ranks gives the HF count."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    vocab_size = model.oapl_vocab_size
    rows_per_rank = make_vocab_padding(vocab_size, ctx.tp) // ctx.tp
    first_row = ctx.tp_rank * rows_per_rank
    real_rows = max(0, min(vocab_size, first_row + rows_per_rank) - first_row)
    total = 0
    for name, p in model.named_parameters():
        if getattr(p, "shared", False):
            continue  # last stage's copy of the tied embedding (megatron marks it shared)
        if not param_is_not_tensor_parallel_duplicate(p):
            continue  # replicated over TP (norm weights): counted on tp_rank 0 only
        if name.endswith("embedding.word_embeddings.weight") or name.endswith("output_layer.weight"):
            total += real_rows * p.shape[1]  # [padded/tp, hidden] vocab shard without its padding rows
        else:
            total += p.numel()
    return total


def count_parameters(chunks: list, ctx: ParallelContext) -> int:
    """Global unique parameter count of the policy (equals the HF model's ``sum(p.numel())``, tied weight once).

    Collective: every rank of the world calls it; one int64 all-reduce (sum) over the default group, where only
    dp_rank 0 contributes.
    """
    local = sum(_local_count(m, ctx) for m in chunks) if ctx.dp_rank == 0 else 0
    t = torch.tensor([local], dtype=torch.int64, device=ctx.device)
    if torch.distributed.is_initialized() and ctx.world_size > 1:
        torch.distributed.all_reduce(t)
    return int(t.item())
