"""Typed, versioned messages between the trainer and the inference engines (no torch, no vLLM).

Everything that crosses the engine control plane is one of these dataclasses (pickled by
``multiprocessing.connection``) wrapped in a :class:`Request` / :class:`Reply` envelope that carries
``PROTOCOL_VERSION``; an engine server refuses a request from a client speaking another protocol version, so a
trainer and an engine built from different checkouts fail at attach time instead of misreading each other.

``Sample.policy_version`` is the weight version (number of completed weight syncs, 0 = initial checkpoint) that
produced every token of the sample: engines never change weights in the middle of a request (STYLE principle 11:
lag is carried on every sample and checked where data is consumed).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Hashable

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: ``n`` completions per prompt (the group size G)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    # Base seed; prompt ``p`` is sampled with ``seed + prompt_seed_offset(p)`` so its completions do not depend on
    # which engine served it or what else was in the batch. None: nondeterministic.
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # The log-prob convention the caller relies on ("tempered" | "raw", see ``rollout.logprobs``); the engine refuses
    # the request if it serves the other one. None: the caller does not use the log-probs (evaluation).
    logprobs: str | None = None

    def __post_init__(self):
        if self.logprobs not in (None, "tempered", "raw"):
            raise ValueError(f"SamplingSpec.logprobs must be None, 'tempered' or 'raw', got {self.logprobs!r}")
        if self.n < 1:
            raise ValueError(f"SamplingSpec.n must be ≥ 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingSpec.temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingSpec.max_tokens must be ≥ 1, got {self.max_tokens}")


def prompt_seed_offset(prompt_id: Hashable) -> int:
    """A stable per-prompt seed offset (Python's ``hash`` of a str changes between processes)."""
    if isinstance(prompt_id, int):
        return prompt_id % (1 << 31)
    return zlib.crc32(repr(prompt_id).encode()) % (1 << 31)


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete ``SamplingSpec.n`` times."""

    prompt_id: Hashable
    prompt_token_ids: tuple[int, ...]

    def __post_init__(self):
        if len(self.prompt_token_ids) == 0:
            raise ValueError(f"prompt {self.prompt_id!r} has no tokens")


@dataclass(frozen=True)
class Sample:
    """One completion. ``token_logprobs[i]`` is log π_old(token_ids[i] | prompt, token_ids[:i]) of the *sampled*
    token under the engine's log-prob convention (``EngineSpec.logprobs``): tempered = log_softmax(logits / T)
    (after top-p, if any), raw = log_softmax(logits)."""

    prompt_id: Hashable
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    finish_reason: str  # "stop" | "length" | "abort"
    policy_version: int
    engine_id: int
    sample_index: int = 0  # 0 .. n-1 within the prompt's group

    def __post_init__(self):
        if len(self.token_ids) != len(self.token_logprobs):
            raise ValueError(f"sample of prompt {self.prompt_id!r}: {len(self.token_ids)} tokens but "
                             f"{len(self.token_logprobs)} log-probs")


@dataclass(frozen=True)
class Request:
    """Control-plane envelope: ``op`` names an engine-server handler, ``args`` its keyword arguments."""

    op: str
    args: dict[str, Any] = field(default_factory=dict)
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Reply:
    """``ok`` → ``value``; otherwise ``error`` is ``"ExceptionType: message"`` and ``traceback`` the remote one."""

    ok: bool
    value: Any = None
    error: str = ""
    traceback: str = ""
    protocol: int = PROTOCOL_VERSION
