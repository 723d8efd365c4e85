"""Model FLOPs of a dense RMSNorm/SwiGLU/RoPE decoder (:class:`ArchSpec`), counted from the architecture.

Pure arithmetic, no torch. Conventions (the ones MFU numbers in Megatron-LM, PaLM and torchtitan use):

- A multiply-add is 2 FLOPs. Only matrix products are counted: q/k/v/o and gate/up/down projections, the LM
  head, and attention's two batched products (QKᵀ and AV). Norms, RoPE, softmax, SiLU and the embedding lookup
  are element-wise or gathers (< 1 % for every model here) and are left out.
- Attention is causal: query position i (1-based) attends to i keys, so one head of one layer costs
  2·head_dim·i for QKᵀ plus the same for AV. Over a sequence of S tokens that is 2·head_dim·S·(S+1) per head.
  (Megatron's formula counts the full S² square; ``causal=False`` reproduces that.)
- The LM head uses the unpadded vocabulary; tied and untied embeddings cost the same FLOPs (only the parameter
  count differs).
- Training is forward + backward = 3 × forward (the backward computes gradients of activations and of weights).
  These are *model* FLOPs: activation recomputation does not raise them (it raises hardware FLOPs).

    from oapl_megatron.profile.flops import train_flops
    train_flops(arch, [512, 700, 300])          # one optimizer step over three sequences of those lengths
"""

from __future__ import annotations

from collections.abc import Iterable

from oapl_megatron.models.hf_config import ArchSpec


def matmul_params_per_layer(arch: ArchSpec) -> int:
    """Weights of one layer that take part in a matrix product with every token (q, k, v, o, gate, up, down)."""
    h, d = arch.hidden, arch.head_dim
    q = h * d * arch.heads
    kv = 2 * h * d * arch.kv_heads
    o = d * arch.heads * h
    mlp = 3 * h * arch.ffn_hidden
    return q + kv + o + mlp


def dense_forward_flops_per_token(arch: ArchSpec) -> int:
    """Forward FLOPs per token that do not depend on the sequence length: every layer's projections + LM head."""
    return 2 * (arch.num_layers * matmul_params_per_layer(arch) + arch.hidden * arch.vocab_size)


def attention_forward_flops(arch: ArchSpec, seq_len: int, causal: bool = True) -> int:
    """Forward FLOPs of QKᵀ and AV over one sequence of ``seq_len`` tokens, all layers and heads."""
    if seq_len < 0:
        raise ValueError(f"attention_forward_flops: seq_len={seq_len} must be >= 0")
    pairs = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len  # (query, key) pairs
    return arch.num_layers * arch.heads * 2 * 2 * arch.head_dim * pairs


def forward_flops(arch: ArchSpec, seq_lens: Iterable[int], causal: bool = True) -> int:
    """Forward FLOPs over sequences of the given lengths (each sequence attends only to itself)."""
    dense = dense_forward_flops_per_token(arch)
    return sum(dense * s + attention_forward_flops(arch, s, causal) for s in seq_lens)


def train_flops(arch: ArchSpec, seq_lens: Iterable[int], causal: bool = True) -> int:
    """Model FLOPs of one forward + backward over sequences of the given lengths (3 × forward)."""
    return 3 * forward_flops(arch, seq_lens, causal)


def decode_flops_per_token(arch: ArchSpec, context: int) -> int:
    """Forward FLOPs to generate one token at position ``context`` (it attends to ``context`` cached keys)."""
    return dense_forward_flops_per_token(arch) + arch.num_layers * arch.heads * 4 * arch.head_dim * context


def weight_bytes(arch: ArchSpec, bytes_per_param: int = 2) -> int:
    """Bytes of the full model's weights (what a weight sync sends and what a decode step reads)."""
    return arch.num_params * bytes_per_param


def kv_bytes_per_token(arch: ArchSpec, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one token of context occupies over all layers (K and V, GQA heads)."""
    return 2 * arch.num_layers * arch.kv_heads * arch.head_dim * bytes_per_value
