"""Architectures of the models the cost model and ``oapl-profile sweep`` know by name, and GPU data sheets.

Model values are copied from each model's Hugging Face ``config.json`` (the hub is not reachable from the machines
this runs on); ``arch(name)`` also accepts a path to a config.json / HF directory. GPU values are vendor data
sheets (dense, no sparsity): peak FLOP/s per dtype, HBM bandwidth and capacity, NVLink bandwidth per direction
per GPU, and the usual InfiniBand NIC per GPU (400 Gb/s = 50 GB/s).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from oapl_megatron.models.hf_config import ArchSpec, arch_from_hf


def _qwen3(layers, hidden, ffn, heads, kv_heads, tied, vocab=151936, max_pos=40960) -> ArchSpec:
    return ArchSpec(family="qwen3", num_layers=layers, hidden=hidden, ffn_hidden=ffn, heads=heads, kv_heads=kv_heads,
                    head_dim=128, vocab_size=vocab, rope_theta=1e6, rms_eps=1e-6, tie_word_embeddings=tied,
                    qkv_bias=False, qk_norm=True, max_position_embeddings=max_pos)


MODELS: dict[str, ArchSpec] = {
    "qwen3-0.6b": _qwen3(28, 1024, 3072, 16, 8, tied=True),
    "qwen3-1.7b": _qwen3(28, 2048, 6144, 16, 8, tied=True),
    "qwen3-4b": _qwen3(36, 2560, 9728, 32, 8, tied=True),
    "qwen3-8b": _qwen3(36, 4096, 12288, 32, 8, tied=False),
    "qwen3-14b": _qwen3(40, 5120, 17408, 40, 8, tied=False),
    "qwen3-32b": _qwen3(64, 5120, 25600, 64, 8, tied=False),
    # DeepSeek-R1-Distill-Qwen-14B is a Qwen2.5-14B: q/k/v bias, head_dim 128, untied.
    "r1-distill-qwen-14b": ArchSpec(family="qwen2", num_layers=48, hidden=5120, ffn_hidden=13824, heads=40,
                                    kv_heads=8, head_dim=128, vocab_size=152064, rope_theta=1e6, rms_eps=1e-5,
                                    tie_word_embeddings=False, qkv_bias=True, qk_norm=False,
                                    max_position_embeddings=131072),
    # Small ones for CPU sweeps and tests (not released models).
    "tiny": ArchSpec(family="qwen3", num_layers=2, hidden=64, ffn_hidden=128, heads=4, kv_heads=2, head_dim=16,
                     vocab_size=128, rope_theta=1e6, rms_eps=1e-6, tie_word_embeddings=True, qkv_bias=False,
                     qk_norm=True, max_position_embeddings=512),
    # the CPU demo's policy (oapl_megatron/entrypoints/demo.py TINY_QWEN3 with its 21-symbol char tokenizer)
    "demo": ArchSpec(family="qwen3", num_layers=4, hidden=128, ffn_hidden=384, heads=4, kv_heads=2, head_dim=32,
                     vocab_size=21, rope_theta=1e4, rms_eps=1e-6, tie_word_embeddings=True, qkv_bias=False,
                     qk_norm=True, max_position_embeddings=256),
    "cpu-small": ArchSpec(family="qwen3", num_layers=8, hidden=256, ffn_hidden=704, heads=8, kv_heads=4, head_dim=32,
                          vocab_size=512, rope_theta=1e6, rms_eps=1e-6, tie_word_embeddings=False, qkv_bias=False,
                          qk_norm=True, max_position_embeddings=1024),
}


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_flops: dict  # dtype → dense FLOP/s
    hbm_bytes_per_s: float
    hbm_bytes: float
    nvlink_bytes_per_s: float  # per GPU, one direction, inside a node
    net_bytes_per_s: float  # per GPU, between nodes
    gpus_per_node: int = 8


GPUS: dict[str, GPUSpec] = {
    # H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 80 GB, NVLink4 450 GB/s per direction, 400 Gb/s IB per GPU
    "h100": GPUSpec("H100-SXM", {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12}, 3.35e12, 80e9, 450e9, 50e9),
    # H200 SXM: same compute as H100, 4.8 TB/s HBM3e, 141 GB
    "h200": GPUSpec("H200-SXM", {"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12}, 4.8e12, 141e9, 450e9, 50e9),
}


def arch(name_or_path: str) -> ArchSpec:
    """A preset name (see :data:`MODELS`) or a Hugging Face config path."""
    key = name_or_path.lower()
    if key in MODELS:
        return MODELS[key]
    if Path(name_or_path).exists():
        return arch_from_hf(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}: not a preset ({', '.join(MODELS)}) and no such path")


def arch_to_hf_config(a: ArchSpec) -> dict:
    """A transformers config dict for a preset (to build a random model of that shape for sweeps)."""
    cfg = {"model_type": a.family, "num_hidden_layers": a.num_layers, "hidden_size": a.hidden,
           "intermediate_size": a.ffn_hidden, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
           "head_dim": a.head_dim, "vocab_size": a.vocab_size, "rope_theta": a.rope_theta,
           "rms_norm_eps": a.rms_eps, "tie_word_embeddings": a.tie_word_embeddings,
           "max_position_embeddings": a.max_position_embeddings, "hidden_act": "silu"}
    return cfg
