"""The tiny Qwen3 of the short real runs: its config, and a policy warm-started on given examples
(tests/test_code_loop.py, tests/test_code_dataset_loop.py, tests/test_profile_breakdown.py)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_config(tok, max_positions: int):
    """A 2-layer, 64-wide, tied-embedding Qwen3 config for the character tokenizer ``tok``."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=max_positions,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


def warm_started_policy(out: Path, tok, examples, max_positions: int, steps: int = 300) -> Path:
    """Build a 2-layer, 64-wide Qwen3 for ``tok``'s vocabulary, train it on ``examples`` (seeded, one thread) and save
    it next to the tokenizer in ``out``."""
    from transformers import Qwen3ForCausalLM

    from oapl_megatron.orchestrator.warmstart import warm_start

    cfg = tiny_config(tok, max_positions)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Qwen3ForCausalLM(cfg)
    warm_start(model, tok, examples, steps=steps, batch_size=32, lr=3e-3, log=None)
    model.save_pretrained(out)
    return out
