"""Held-out evaluation inside the training loop: the accuracy of the policy the engines serve.

Sampled pass@1 (the mean over ``cfg.samples`` samples per prompt at the rollout temperature — the metric RL
optimizes), pass@``samples``, and optionally greedy accuracy, on the first ``cfg.prompts`` of the task's held-out
prompts. The engines serve the last synced weights, so the result is labelled with that policy version
(``eval_version``).

    metrics = evaluate(engines, task, tokenizer, cfg.eval, cfg.rollout)   # {"eval_accuracy": 0.73, ...}
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from oapl_megatron.config.loop import HeldOutEvalConfig
from oapl_megatron.config.rollout import RolloutConfig
from oapl_megatron.rollout.types import GenerationRequest, SamplingSpec
from oapl_megatron.tasks.base import Prompt, Task
from oapl_megatron.tasks.registry import reward_workers
from oapl_megatron.tasks.tokenizer import decode_completion, encode_prompt

EVAL_SEED = 12345  # fixed: every evaluation of a run samples with the same seeds, so curves compare policies only


def evaluate(engines, task: Task, tokenizer, cfg: HeldOutEvalConfig, rollout: RolloutConfig) -> dict[str, float]:
    """Held-out accuracy of the policy the engines serve: sampled pass@1 (mean over ``cfg.samples`` samples at
    the rollout temperature) and, optionally, greedy accuracy."""
    prompts = task.eval_prompts()[: cfg.prompts]
    reqs = [GenerationRequest(p.id, tuple(encode_prompt(tokenizer, p))) for p in prompts]
    stop = (tokenizer.eos_token_id,)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    sampled = engines.generate(reqs, SamplingSpec(n=cfg.samples, temperature=rollout.temperature,
                                                  top_p=rollout.top_p, max_tokens=rollout.max_tokens, seed=EVAL_SEED,
                                                  stop_token_ids=stop))
    correct = _score(task, tokenizer, [(prompts[i // cfg.samples], s) for i, s in enumerate(sampled)])
    out["eval_accuracy"] = sum(correct) / len(correct)  # sampled pass@1 at the rollout temperature
    per_prompt = [max(correct[i * cfg.samples : (i + 1) * cfg.samples]) for i in range(len(prompts))]
    out[f"eval_pass@{cfg.samples}"] = sum(per_prompt) / len(prompts)
    if cfg.greedy:
        greedy = engines.generate(reqs, SamplingSpec(n=1, temperature=0.0, max_tokens=rollout.max_tokens,
                                                     stop_token_ids=stop))
        out["eval_greedy_accuracy"] = sum(_score(task, tokenizer, list(zip(prompts, greedy)))) / len(prompts)
    out["eval_seconds"] = time.perf_counter() - t0
    out["eval_version"] = float(sampled[0].policy_version) if sampled else -1.0
    return out


def _score(task: Task, tokenizer, pairs: list[tuple[Prompt, object]]) -> list[float]:
    """Rewards of (prompt, sample) pairs, in order, on as many threads as the task's reward pool uses (code: one
    sandboxed program per response, so scoring is most of an evaluation's time; math and arithmetic: one)."""
    def one(pair):
        prompt, sample = pair
        return task.reward(prompt, decode_completion(tokenizer, sample.token_ids)).reward

    workers = reward_workers(task)
    if workers <= 1:
        return [one(p) for p in pairs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval-reward") as pool:
        return list(pool.map(one, pairs))
