"""Tiny random Hugging Face models (llama untied, qwen2 tied with q/k/v bias, qwen3 tied and untied with q/k norms)
for the weight-mapping, loader and converter tests. Built from configs only (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch

# Vocab 101: prime, so TP=2/4 always pads the Megatron vocabulary. kv_heads 2 < heads 4: GQA.
_COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3_tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=16, rope_theta=1e6)),
    "qwen3_untied": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=16)),
}


def make_model(name: str, seed: int = 0, dtype=torch.float32):
    """A random tiny transformers model; norms and biases are random too, so a mix-up of them shows."""
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**_COMMON, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(dtype).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if n.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model


def save_model(name: str, out: Path, seed: int = 0, max_shard_size: str | None = None, dtype=torch.float32):
    model = make_model(name, seed, dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return model


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()
