"""Hugging Face ↔ Megatron-core parameter mapping for the dense decoder families (llama, qwen2, qwen3).

Pure: imports only torch. This is the ONE mapping used by the weight sync, the checkpoint converter and the trainer's
HF loader; each of those only decides *which* rank holds *which* shard and moves bytes.

Naming convention
-----------------
Megatron names here are *canonical*: the layer number in ``decoder.layers.{i}.…`` is the GLOBAL layer index (0 ..
num_layers-1). A live Megatron model chunk uses a LOCAL index (per pipeline stage and virtual chunk); convert with
:func:`LayerPlacement.to_global_name` / :func:`LayerPlacement.to_local_name`.

Rules are data (:class:`ParamRule`): a Megatron name template, the HF name templates it is built from, and a
:class:`Kind` that says how the full tensor is split over tensor-parallel (TP) ranks:

==========  =====================================================================================================
kind        TP layout of the Megatron tensor (shapes for one layer; ``in`` = hidden, ``G`` = kv heads)
==========  =====================================================================================================
replicated  every rank holds the full tensor (layer norms, q/k norms)
column      rows split in ``tp`` contiguous chunks (dim 0)
row         columns split in ``tp`` contiguous chunks (dim 1): ``linear_proj``, ``linear_fc2``
vocab       rows split after zero-padding the vocabulary to ``padded_vocab`` (embedding, output layer)
qkv         HF q/k/v fused per query group ``g``: ``[q rows of the heads of g (heads/G·head_dim); k (head_dim);
            v (head_dim)]`` for g = 0..G-1, shape ``[(heads + 2G)·head_dim, *rest]``; then split on dim 0 like
            ``column`` (so with G % tp == 0 a rank holds G/tp whole groups — megatron's ``attention.py`` reads the
            local shard as ``[ng/tp, (np/ng + 2)·hn]``). Used for the weight and (qwen2) the bias.
gate_up     ``linear_fc1`` with a gated linear unit: TP shard r is ``[gate rows of shard r; up rows of shard r]``
            (megatron's MLP ``torch.chunk(x, 2, dim=-1)`` on the local output: first half is the gate)
==========  =====================================================================================================

Verified against megatron-core 0.16.1 (``transformer/attention.py`` get_query_key_value_tensors, ``transformer/mlp.py``
glu, ``transformer/transformer_layer.py`` get_transformer_layer_offset, ``models/gpt/gpt_layer_specs.py``) and, by
the tests, against real models built on CPU.

The ``arch`` argument is duck-typed (``oapl_megatron.models.hf_config.ArchSpec`` fits): it needs ``family``,
``num_layers``, ``hidden``, ``ffn_hidden``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab_size``,
``tie_word_embeddings``, ``qkv_bias``, ``qk_norm``.

Typical use::

    rules = param_rules(arch, spec="local")
    shard = hf_to_megatron_shard(arch, hf_tensors, "decoder.layers.3.self_attention.linear_qkv.weight",
                                 tp_rank=1, tp_size=2, padded_vocab=256)
    hf = megatron_shards_to_hf(arch, "decoder.layers.3.self_attention.linear_qkv.weight", [s0, s1], 256)
    # {"model.layers.3.self_attn.q_proj.weight": ..., "...k_proj.weight": ..., "...v_proj.weight": ...}
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

# One error class for "this model cannot be represented" across the project (hf_config is pure, no torch).
from oapl_megatron.models.hf_config import SUPPORTED_FAMILIES, UnsupportedArchitectureError

SpecName = Literal["local", "te"]
__all__ = ["UnsupportedArchitectureError", "MappingError", "Kind", "ParamRule", "param_rules", "find_rule",
           "hf_to_megatron_shard", "megatron_shards_to_hf", "layer_placement", "LayerPlacement", "hf_shapes",
           "expected_hf_shape", "megatron_names_in_order", "hf_names_in_order"]


class MappingError(ValueError):
    """A name has no rule, or a tensor has the wrong shape for the rule; the message names the tensor."""


class Kind(str, enum.Enum):
    """How a Megatron tensor is laid out over tensor-parallel ranks (see the module docstring)."""

    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    QKV = "qkv"
    GATE_UP = "gate_up"


@dataclass(frozen=True)
class ParamRule:
    """One Megatron parameter and the HF tensors it is made of.

    ``megatron`` and ``hf`` are templates with ``{i}`` = global layer index (absent for non-layer tensors).
    ``hf`` has 3 names for ``qkv`` (q, k, v), 2 for ``gate_up`` (gate, up), 1 otherwise.
    ``load_only``: the tensor is loaded from HF but not emitted back (the tied output layer on the last pipeline
    stage; its HF twin comes from the embedding).
    """

    megatron: str
    hf: tuple[str, ...]
    kind: Kind
    per_layer: bool
    load_only: bool = False

    def megatron_name(self, layer: int | None = None) -> str:
        return self.megatron.format(i=layer) if self.per_layer else self.megatron

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf) if self.per_layer else self.hf


# --------------------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------------------

_L = "decoder.layers.{i}."
_H = "model.layers.{i}."


def _check_family(arch) -> None:
    family = getattr(arch, "family", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedArchitectureError(
            f"model family {family!r} has no HF↔Megatron mapping; supported: {', '.join(SUPPORTED_FAMILIES)} "
            "(dense decoders with RMSNorm, RoPE, SwiGLU, GQA). Add rules in oapl_megatron/models/mapping.py"
        )


def param_rules(arch, spec: SpecName = "local") -> list[ParamRule]:
    """Every Megatron parameter of a full (TP1/PP1) model of ``arch`` with the given layer spec, in model order.

    ``spec="local"``: ``get_gpt_layer_local_spec``; ``spec="te"``: Transformer Engine spec, where the two layer
    norms are fused into ``linear_qkv.layer_norm_weight`` and ``linear_fc1.layer_norm_weight``.
    Raises :class:`UnsupportedArchitectureError` for other families.
    """
    _check_family(arch)
    if spec not in ("local", "te"):
        raise ValueError(f"spec must be 'local' or 'te', got {spec!r}")
    if arch.qk_norm and arch.family != "qwen3":
        raise UnsupportedArchitectureError(f"qk_norm is only mapped for qwen3, not {arch.family!r}")
    te = spec == "te"
    rules = [ParamRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Kind.VOCAB, False)]
    in_ln = _L + ("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight")
    rules.append(ParamRule(in_ln, (_H + "input_layernorm.weight",), Kind.REPLICATED, True))
    rules.append(ParamRule(_L + "self_attention.linear_qkv.weight",
                           tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"), Kind.QKV, True))
    if arch.qkv_bias:
        rules.append(ParamRule(_L + "self_attention.linear_qkv.bias",
                               tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"), Kind.QKV, True))
    if arch.qk_norm:
        rules.append(ParamRule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",),
                               Kind.REPLICATED, True))
        rules.append(ParamRule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",),
                               Kind.REPLICATED, True))
    rules.append(ParamRule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), Kind.ROW,
                           True))
    post_ln = _L + ("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight")
    rules.append(ParamRule(post_ln, (_H + "post_attention_layernorm.weight",), Kind.REPLICATED, True))
    rules.append(ParamRule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
                           Kind.GATE_UP, True))
    rules.append(ParamRule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), Kind.ROW, True))
    rules.append(ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",), Kind.REPLICATED, False))
    if arch.tie_word_embeddings:
        # Megatron keeps a copy of the embedding as output_layer.weight on the last stage when PP > 1.
        rules.append(ParamRule("output_layer.weight", ("model.embed_tokens.weight",), Kind.VOCAB, False,
                               load_only=True))
    else:
        rules.append(ParamRule("output_layer.weight", ("lm_head.weight",), Kind.VOCAB, False))
    return rules


def megatron_names_in_order(arch, spec: SpecName = "local") -> list[str]:
    """Canonical Megatron names of a full model, layer by layer (embedding, layer 0 …, final norm, output)."""
    rules = param_rules(arch, spec)
    names = [r.megatron for r in rules if not r.per_layer and r.megatron.startswith("embedding.")]
    for i in range(arch.num_layers):
        names += [r.megatron_name(i) for r in rules if r.per_layer]
    names += [r.megatron for r in rules if not r.per_layer and not r.megatron.startswith("embedding.")]
    return names


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def split_layer_name(megatron_name: str) -> tuple[int | None, str]:
    """``decoder.layers.7.mlp.linear_fc2.weight`` → ``(7, "decoder.layers.{i}.mlp.linear_fc2.weight")``."""
    m = _LAYER_RE.match(megatron_name)
    if m is None:
        return None, megatron_name
    return int(m.group(1)), _L + m.group(2)


def find_rule(arch, megatron_name: str, spec: SpecName = "local") -> tuple[ParamRule, int | None]:
    """The rule of a canonical (global-index) Megatron name and its layer index; :class:`MappingError` if none."""
    layer, template = split_layer_name(megatron_name)
    for rule in param_rules(arch, spec):
        if rule.megatron == template:
            if layer is not None and not 0 <= layer < arch.num_layers:
                raise MappingError(f"{megatron_name}: layer {layer} outside 0..{arch.num_layers - 1}")
            return rule, layer
    raise MappingError(
        f"no HF mapping for Megatron parameter {megatron_name!r} (family {arch.family}, spec {spec}); "
        "is the model built with the same layer spec / features (qkv_bias, qk_norm, tied embeddings)?"
    )


def _template_shapes(arch) -> dict[str, tuple[int, ...]]:
    """Expected shapes keyed by HF name template (``{i}`` = layer)."""
    _check_family(arch)
    h, hd = arch.hidden, arch.head_dim
    q, kv = arch.heads * hd, arch.kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    shapes.update({
        _H + "input_layernorm.weight": (h,),
        _H + "self_attn.q_proj.weight": (q, h),
        _H + "self_attn.k_proj.weight": (kv, h),
        _H + "self_attn.v_proj.weight": (kv, h),
    })
    if arch.qkv_bias:
        shapes.update({_H + "self_attn.q_proj.bias": (q,), _H + "self_attn.k_proj.bias": (kv,),
                       _H + "self_attn.v_proj.bias": (kv,)})
    if arch.qk_norm:
        shapes.update({_H + "self_attn.q_norm.weight": (hd,), _H + "self_attn.k_norm.weight": (hd,)})
    shapes.update({
        _H + "self_attn.o_proj.weight": (h, q),
        _H + "post_attention_layernorm.weight": (h,),
        _H + "mlp.gate_proj.weight": (arch.ffn_hidden, h),
        _H + "mlp.up_proj.weight": (arch.ffn_hidden, h),
        _H + "mlp.down_proj.weight": (h, arch.ffn_hidden),
    })
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def expected_hf_shape(arch, hf_name: str) -> tuple[int, ...]:
    """Shape an HF tensor must have for ``arch``; :class:`MappingError` for a name ``arch`` does not have."""
    m = _HF_LAYER_RE.match(hf_name)
    template = _H + m.group(2) if m else hf_name
    shape = _template_shapes(arch).get(template)
    if shape is None or (m and not 0 <= int(m.group(1)) < arch.num_layers):
        raise MappingError(f"HF tensor {hf_name!r} is not part of a {arch.family} model with this config")
    return shape


def hf_shapes(arch) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor of ``arch`` (``lm_head.weight`` only when untied), layer by layer."""
    templates = _template_shapes(arch)
    shapes = {"model.embed_tokens.weight": templates["model.embed_tokens.weight"]}
    for i in range(arch.num_layers):
        shapes.update({t.format(i=i): s for t, s in templates.items() if t.startswith(_H)})
    shapes.update({n: s for n, s in templates.items() if n in ("model.norm.weight", "lm_head.weight")})
    return shapes


def hf_names_in_order(arch) -> list[str]:
    """HF tensor names in the order :func:`megatron_shards_to_hf` emits them (layer by layer)."""
    return list(hf_shapes(arch))


# --------------------------------------------------------------------------------------------------------------
# TP split / merge
# --------------------------------------------------------------------------------------------------------------


def _even(size: int, tp_size: int, what: str) -> int:
    if size % tp_size:
        raise MappingError(f"{what}: dim of size {size} does not split over tp={tp_size}")
    return size // tp_size


def _fuse_qkv(arch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [H·hd, *r], k/v [G·hd, *r] → fused [(H + 2G)·hd, *r], grouped ``[q_g; k_g; v_g]`` per query group g."""
    g, hd = arch.kv_heads, arch.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, (arch.heads // g) * hd, *rest)  # [G, H/G·hd, *r]
    k = k.reshape(g, hd, *rest)
    v = v.reshape(g, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _unfuse_qkv(arch, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, hd = arch.kv_heads, arch.head_dim
    qpg = (arch.heads // g) * hd
    rest = fused.shape[1:]
    grouped = fused.reshape(g, qpg + 2 * hd, *rest)  # [G, (H/G + 2)·hd, *r]
    q, k, v = torch.split(grouped, [qpg, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise MappingError(f"{name}: shape {tuple(t.shape)} != expected {tuple(expected)} for this architecture")


def _check_gqa(arch) -> None:
    if arch.heads % arch.kv_heads:
        raise MappingError(f"heads={arch.heads} is not a multiple of kv_heads={arch.kv_heads}")


def hf_to_megatron_shard(arch, hf_tensors: Mapping[str, torch.Tensor], megatron_name: str, tp_rank: int,
                         tp_size: int, padded_vocab: int, spec: SpecName = "local") -> torch.Tensor:
    """The TP shard ``tp_rank`` of canonical Megatron parameter ``megatron_name``, built from HF tensors.

    ``hf_tensors`` may be lazy (only the names of this rule are read). Shapes are checked against ``arch``.
    Returns a tensor in the HF dtype (possibly a view of the input); the caller copies it into the parameter.
    Vocab tensors come back zero-padded to ``padded_vocab / tp_size`` rows.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} outside 0..{tp_size - 1}")
    rule, layer = find_rule(arch, megatron_name, spec)
    names = rule.hf_names(layer)
    tensors = []
    for n in names:
        try:
            t = hf_tensors[n]
        except KeyError:
            raise MappingError(f"HF tensor {n!r} (needed for {megatron_name}) is missing") from None
        _check_shape(n, t, expected_hf_shape(arch, n))
        tensors.append(t)

    kind = rule.kind
    if kind is Kind.REPLICATED:
        return tensors[0]
    if kind is Kind.COLUMN:
        n = _even(tensors[0].shape[0], tp_size, megatron_name)
        return tensors[0].narrow(0, tp_rank * n, n)
    if kind is Kind.ROW:
        n = _even(tensors[0].shape[1], tp_size, megatron_name)
        return tensors[0].narrow(1, tp_rank * n, n)
    if kind is Kind.VOCAB:
        full = tensors[0]
        if padded_vocab < full.shape[0]:
            raise MappingError(f"{megatron_name}: padded_vocab={padded_vocab} < vocab size {full.shape[0]}")
        n = _even(padded_vocab, tp_size, f"{megatron_name} (padded vocab)")
        lo, hi = tp_rank * n, (tp_rank + 1) * n
        real = full[lo:min(hi, full.shape[0])]  # rows of this shard that exist in HF; the rest is padding
        if real.shape[0] == n:
            return real
        pad = torch.zeros((n - real.shape[0], *full.shape[1:]), dtype=full.dtype, device=full.device)
        return torch.cat([real, pad], dim=0)
    if kind is Kind.QKV:
        _check_gqa(arch)
        fused = _fuse_qkv(arch, *tensors)
        n = _even(fused.shape[0], tp_size, megatron_name)
        return fused.narrow(0, tp_rank * n, n)
    if kind is Kind.GATE_UP:
        gate, up = tensors
        n = _even(gate.shape[0], tp_size, megatron_name)
        return torch.cat([gate.narrow(0, tp_rank * n, n), up.narrow(0, tp_rank * n, n)], dim=0)
    raise AssertionError(kind)


def megatron_shards_to_hf(arch, megatron_name: str, shards: Sequence[torch.Tensor], padded_vocab: int,
                          spec: SpecName = "local") -> dict[str, torch.Tensor]:
    """Merge the TP shards (index = tp rank) of canonical ``megatron_name`` into full HF tensors.

    Inverse of :func:`hf_to_megatron_shard` (bit-exact). Vocab padding rows are stripped. Replicated tensors take
    shard 0. A ``load_only`` rule (tied output layer) returns ``{}``.
    """
    rule, layer = find_rule(arch, megatron_name, spec)
    if rule.load_only:
        return {}
    names = rule.hf_names(layer)
    if not shards:
        raise MappingError(f"{megatron_name}: no shards given")
    kind = rule.kind
    if kind is Kind.REPLICATED:
        return {names[0]: shards[0]}
    if kind is Kind.ROW:
        return {names[0]: torch.cat(list(shards), dim=1)}
    full = torch.cat(list(shards), dim=0) if len(shards) > 1 else shards[0]
    if kind is Kind.COLUMN:
        return {names[0]: full}
    if kind is Kind.VOCAB:
        if full.shape[0] != padded_vocab:
            raise MappingError(f"{megatron_name}: {full.shape[0]} rows after TP merge != padded_vocab={padded_vocab}")
        return {names[0]: full[: arch.vocab_size]}
    if kind is Kind.QKV:
        _check_gqa(arch)
        return dict(zip(names, _unfuse_qkv(arch, full)))
    if kind is Kind.GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]  # each shard: [gate_r; up_r]
        gate = torch.cat([h[0] for h in halves], dim=0)
        up = torch.cat([h[1] for h in halves], dim=0)
        return {names[0]: gate, names[1]: up}
    raise AssertionError(kind)


# --------------------------------------------------------------------------------------------------------------
# Pipeline / virtual-pipeline layer placement
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlacement:
    """Megatron's assignment of global layers to (pp_rank, vpp_chunk, local_index), even split only.

    Without VPP stage p holds layers ``[p·L/pp, (p+1)·L/pp)``. With VPP (interleaved), chunk c of stage p holds
    ``L/(pp·vpp)`` layers starting at ``c·L/vpp + p·L/(pp·vpp)`` (megatron ``get_transformer_layer_offset``).
    ``vpp`` is 1 when virtual pipelining is off.
    """

    num_layers: int
    pp: int
    vpp: int

    @property
    def per_chunk(self) -> int:
        return self.num_layers // (self.pp * self.vpp)

    def offset(self, pp_rank: int, chunk: int) -> int:
        """Global index of local layer 0 of (pp_rank, chunk)."""
        return chunk * (self.num_layers // self.vpp) + pp_rank * self.per_chunk

    def locate(self, global_layer: int) -> tuple[int, int, int]:
        """global layer → (pp_rank, vpp_chunk, local_index)."""
        if not 0 <= global_layer < self.num_layers:
            raise ValueError(f"layer {global_layer} outside 0..{self.num_layers - 1}")
        chunk, rem = divmod(global_layer, self.num_layers // self.vpp)
        pp_rank, local = divmod(rem, self.per_chunk)
        return pp_rank, chunk, local

    def global_index(self, pp_rank: int, chunk: int, local: int) -> int:
        if not (0 <= pp_rank < self.pp and 0 <= chunk < self.vpp and 0 <= local < self.per_chunk):
            raise ValueError(f"(pp_rank={pp_rank}, chunk={chunk}, local={local}) outside pp={self.pp}, "
                             f"vpp={self.vpp}, layers per chunk={self.per_chunk}")
        return self.offset(pp_rank, chunk) + local

    def layers_of(self, pp_rank: int, chunk: int) -> range:
        start = self.offset(pp_rank, chunk)
        return range(start, start + self.per_chunk)

    def is_first(self, pp_rank: int, chunk: int) -> bool:
        """Holds the embedding."""
        return pp_rank == 0 and chunk == 0

    def is_last(self, pp_rank: int, chunk: int) -> bool:
        """Holds the final norm and the output layer."""
        return pp_rank == self.pp - 1 and chunk == self.vpp - 1

    def to_global_name(self, local_name: str, pp_rank: int, chunk: int) -> str:
        """``decoder.layers.{local}.…`` of a live model chunk → canonical ``decoder.layers.{global}.…``."""
        local, template = split_layer_name(local_name)
        if local is None:
            return local_name
        return template.format(i=self.global_index(pp_rank, chunk, local))

    def to_local_name(self, global_name: str) -> tuple[str, tuple[int, int] | None]:
        """Canonical name → (local name, (pp_rank, chunk)); ``None`` placement for non-layer tensors."""
        layer, template = split_layer_name(global_name)
        if layer is None:
            return global_name, None
        pp_rank, chunk, local = self.locate(layer)
        return template.format(i=local), (pp_rank, chunk)


def layer_placement(num_layers: int, pp: int, vpp: int | None = None) -> LayerPlacement:
    """Build a :class:`LayerPlacement`; ``vpp`` None or 1 = no virtual pipeline. Uneven splits are rejected."""
    vpp = vpp or 1
    if pp < 1 or vpp < 1:
        raise ValueError(f"pp={pp} and vpp={vpp} must be >= 1")
    if vpp > 1 and pp < 2:
        raise ValueError(f"vpp={vpp} needs pp >= 2")
    if num_layers % (pp * vpp):
        raise ValueError(f"num_layers={num_layers} does not split evenly over pp={pp} x vpp={vpp} chunks")
    return LayerPlacement(num_layers, pp, vpp)
