"""Hugging Face ``config.json`` → :class:`ArchSpec`, the architecture facts the Megatron builder needs.

Pure: no torch, no megatron. Supports the dense decoder families that share Megatron's GPT layer (RMSNorm,
SwiGLU, RoPE, GQA): ``llama``, ``qwen2`` (q/k/v bias) and ``qwen3`` (per-head q/k RMSNorm, explicit
``head_dim``). Anything the Megatron model would silently compute differently is rejected with an error naming
the config source and the field::

    from oapl_megatron.models.hf_config import arch_from_hf, make_vocab_padding
    arch = arch_from_hf("/models/Qwen3-0.6B")            # a directory, a config.json path, a dict or a PretrainedConfig
    padded = make_vocab_padding(arch.vocab_size, tp=2)

Vocabulary padding: Megatron splits the embedding and output rows evenly over TP ranks, so the Megatron model
has ``make_vocab_padding(vocab_size, tp)`` rows (``vocab_size`` rounded up to a multiple of ``tp``, unchanged
when it already divides). The extra rows sit at the end (ids ``vocab_size..padded-1``); the HF↔Megatron weight
mapping appends zero rows when loading HF weights and strips them when exporting, and logits of the padded ids
must be masked (or sliced off) before any softmax over the vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

Family = Literal["llama", "qwen2", "qwen3"]
SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3")

# Megatron's RoPE implements exactly one rope_scaling: the Llama-3 rule with these constants hard-coded
# (megatron/core/models/common/embeddings/rotary_pos_embedding.py, RotaryEmbedding._apply_scaling).
_MEGATRON_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class UnsupportedArchitectureError(ValueError):
    """The HF config describes a model the Megatron builder cannot reproduce exactly; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Architecture of a dense RMSNorm/SwiGLU/RoPE decoder, in HF terms (unpadded vocabulary)."""

    family: Family
    num_layers: int
    hidden: int
    ffn_hidden: int
    heads: int
    kv_heads: int  # GQA query groups; == heads for MHA
    head_dim: int  # may differ from hidden // heads (Qwen3)
    vocab_size: int  # the HF vocabulary size, before TP padding
    rope_theta: float
    rms_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections only (o_proj and the MLP never have one here)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    max_position_embeddings: int
    rope_scaling_factor: float | None = None  # Llama-3 rope scaling factor; None = no scaling

    @property
    def num_params(self) -> int:
        """Parameter count of the HF model (tied embedding counted once)."""
        h, f, d = self.hidden, self.ffn_hidden, self.head_dim
        attn = h * d * self.heads + 2 * h * d * self.kv_heads + d * self.heads * h
        if self.qkv_bias:
            attn += d * self.heads + 2 * d * self.kv_heads
        if self.qk_norm:
            attn += 2 * d
        layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h


def load_hf_config(path: str | Path) -> tuple[dict, str]:
    """Read ``config.json`` (``path`` is the file or its directory); returns (dict, the file path as a string)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no Hugging Face config at {p} (expected a config.json or a directory holding one)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedArchitectureError(f"{p}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise UnsupportedArchitectureError(f"{p}: top level is {type(data).__name__}, expected an object")
    return data, str(p)


def _as_dict(config: Any) -> tuple[dict, str]:
    if isinstance(config, (str, Path)):
        return load_hf_config(config)
    if isinstance(config, Mapping):
        return dict(config), "<config dict>"
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):  # a transformers.PretrainedConfig
        name = getattr(config, "_name_or_path", "") or type(config).__name__
        return to_dict(), f"<{type(config).__name__} {name}>"
    raise TypeError(f"arch_from_hf: expected a path, a dict or a PretrainedConfig, got {type(config).__name__}")


class _Reader:
    """Field access with errors that name the source and the field."""

    def __init__(self, data: dict, source: str):
        self.data, self.source = data, source

    def fail(self, field: str, why: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(f"{self.source}: field '{field}': {why}")

    def int(self, field: str, *, default: Any = ..., positive: bool = True) -> int:
        value = self.data.get(field, default)
        if value is ...:
            raise self.fail(field, "missing (required to build the model)")
        if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0):
            raise self.fail(field, f"expected a positive integer, got {value!r}")
        return value

    def float(self, field: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.fail(field, f"expected a positive number, got {value!r}")
        return float(value)

    def flag(self, field: str, default: bool) -> bool:
        value = self.data.get(field, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(field, f"expected true/false, got {value!r}")
        return value


def _rope(r: _Reader) -> tuple[float, float | None]:
    """(rope_theta, llama3 scaling factor or None) from either config layout.

    transformers >= 5 writes ``rope_parameters = {"rope_type", "rope_theta", ...}``; older files have a top-level
    ``rope_theta`` and an optional ``rope_scaling`` dict.
    """
    params = r.data.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_theta" in params:
        field, scaling = "rope_parameters", dict(params)
        theta = r.float("rope_parameters.rope_theta", params["rope_theta"])
    else:
        field, scaling = "rope_scaling", r.data.get("rope_scaling") or {}
        theta = r.float("rope_theta", r.data.get("rope_theta", 10000.0))
    if not isinstance(scaling, Mapping):
        raise r.fail(field, f"expected an object, got {scaling!r}")
    for where, value in ((f"{field}.partial_rotary_factor", scaling.get("partial_rotary_factor")),
                         ("partial_rotary_factor", r.data.get("partial_rotary_factor"))):
        if value is not None and float(value) != 1.0:
            raise r.fail(where, f"partial rotary embeddings are not supported (got {value!r}, need 1.0)")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "llama3":
        for key, want in _MEGATRON_LLAMA3_SCALING.items():
            if float(scaling.get(key, -1)) != want:
                raise r.fail(
                    f"{field}.{key}",
                    f"Megatron's llama3 RoPE scaling hard-codes {key}={want}, got {scaling.get(key)!r}",
                )
        return theta, r.float(f"{field}.factor", scaling.get("factor"))
    raise r.fail(f"{field}.rope_type", f"rope scaling {rope_type!r} is not implemented (supported: default, llama3)")


def arch_from_hf(config: Any) -> ArchSpec:
    """HF config (path, dict or ``PretrainedConfig``) → :class:`ArchSpec`; raises naming the source and field."""
    data, source = _as_dict(config)
    r = _Reader(data, source)

    family = data.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise r.fail("model_type", f"{family!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})")
    for moe_field in ("num_experts", "num_local_experts", "n_routed_experts"):
        if data.get(moe_field):
            raise r.fail(moe_field, f"mixture-of-experts models are not supported (got {data[moe_field]!r})")

    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise r.fail("hidden_act", f"only 'silu' (SwiGLU) is supported, got {act!r}")

    if family in ("qwen2", "qwen3"):
        if r.flag("use_sliding_window", False):
            raise r.fail("use_sliding_window", "sliding-window attention is not supported; set it to false")
        layer_types = data.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise r.fail("layer_types", f"only 'full_attention' layers are supported, got {sorted(set(layer_types))}")

    if r.flag("mlp_bias", False):
        raise r.fail("mlp_bias", "MLP biases are not supported (the Megatron model has add_bias_linear=False)")
    if family == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v bias and no o_proj bias
    elif r.flag("attention_bias", False):
        # In Llama/Qwen3 attention_bias also puts a bias on o_proj, which Megatron only offers together with MLP
        # biases (add_bias_linear); building without it would silently drop weights.
        raise r.fail("attention_bias", "true adds an o_proj bias, which the Megatron model cannot represent")
    else:
        qkv_bias = False

    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    kv_heads = r.int("num_key_value_heads", default=heads)
    if heads % kv_heads != 0:
        raise r.fail("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}")
    head_dim = data.get("head_dim")
    if head_dim is None:
        if hidden % heads != 0:
            raise r.fail("num_attention_heads", f"{heads} does not divide hidden_size={hidden} and head_dim is unset")
        head_dim = hidden // heads
    head_dim = r.int("head_dim", default=head_dim)
    if head_dim % 2 != 0:
        raise r.fail("head_dim", f"RoPE needs an even head_dim, got {head_dim}")

    theta, scaling_factor = _rope(r)
    return ArchSpec(
        family=family,
        num_layers=r.int("num_hidden_layers"),
        hidden=hidden,
        ffn_hidden=r.int("intermediate_size"),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=r.int("vocab_size"),
        rope_theta=theta,
        rms_eps=r.float("rms_norm_eps", data.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=r.flag("tie_word_embeddings", False),  # the Llama/Qwen2/Qwen3 config default
        qkv_bias=qkv_bias,
        qk_norm=family == "qwen3",
        max_position_embeddings=r.int("max_position_embeddings", default=2048),
        rope_scaling_factor=scaling_factor,
    )


def make_vocab_padding(vocab_size: int, tp: int) -> int:
    """Rows of the Megatron embedding/output layer: ``vocab_size`` rounded up to a multiple of ``tp``.

    No padding when ``tp`` already divides it (so TP=1 never pads). The padding rows are the last
    ``padded - vocab_size`` ids; see the module docstring for how the weight mapping treats them.
    """
    if vocab_size <= 0 or tp <= 0:
        raise ValueError(f"make_vocab_padding: vocab_size={vocab_size} and tp={tp} must be positive")
    return -(-vocab_size // tp) * tp
