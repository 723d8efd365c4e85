"""Supervised warm start of a small Hugging Face causal LM on a task's worked solutions (single process, CPU).

Used by the demo to give RL a policy that knows the answer format but still makes mistakes it copied from noisy
data (pass@k ≫ pass@1). Loss: mean token cross-entropy over completion tokens (prompt tokens are context only).

    model = warm_start(model, tokenizer, task.sft_examples(3000, seed=0), steps=300, batch_size=32, lr=1e-3)
"""

from __future__ import annotations

import math
import random
import time

import torch

from oapl_megatron.tasks.tokenizer import encode_prompt


def _encode(tokenizer, prompt, completion: str) -> tuple[list[int], int]:
    """[BOS] prompt completion EOS, with the prompt encoded exactly as the engines see it; returns the prompt length."""
    p = encode_prompt(tokenizer, prompt)
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return p + c + [tokenizer.eos_token_id], len(p)


def warm_start(model, tokenizer, examples, *, steps: int, batch_size: int, lr: float, seed: int = 0,
               warmup: int = 20, log=print, log_every: int = 50) -> dict:
    """Train ``model`` in place; returns {"final_loss", "seconds", "tokens_per_s"}."""
    if not examples:
        raise ValueError("warm_start: no examples")
    data = [_encode(tokenizer, ex.prompt, ex.completion) for ex in examples]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.train()
    t0, tokens, ema = time.time(), 0, None
    for step in range(1, steps + 1):
        batch = [data[rng.randrange(len(data))] for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attn = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (seq, p) in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            labels[i, p : len(seq)] = torch.tensor(seq[p:])  # predict completion tokens (+ EOS) only
        out = model(input_ids=ids, attention_mask=attn, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += int(attn.sum())
        ema = out.loss.item() if ema is None else 0.95 * ema + 0.05 * out.loss.item()
        if log and (step % log_every == 0 or step == steps):
            log(f"warm start step {step}/{steps}  loss {ema:.4f}  ({tokens / (time.time() - t0):.0f} tok/s)")
    model.eval()
    secs = time.time() - t0
    return {"final_loss": ema, "seconds": secs, "tokens_per_s": tokens / secs}
