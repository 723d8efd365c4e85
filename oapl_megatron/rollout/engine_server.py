"""One vLLM engine in its own process, served over a small authenticated control plane.

The trainer talks to it with :class:`oapl_megatron.rollout.engine_client.EngineClient`. Transport: a
``multiprocessing.connection`` Listener (HMAC authkey handshake, pickled :class:`~oapl_megatron.rollout.types.Request`
/ :class:`~oapl_megatron.rollout.types.Reply` envelopes). The server is single-threaded and handles one request at
a time, so weights never change in the middle of a generate call and every Sample carries the one version that
produced it.

Local mode (spawned by the trainer, :mod:`oapl_megatron.rollout.engine_process`)::

    python -m oapl_megatron.entrypoints.engine_server --spec spec.json --ready-file ready.json --parent-pid PID

binds a free port on 127.0.0.1, writes ``{"host", "port", "pid"}`` to the ready file once vLLM is up, dies with
its parent (``PR_SET_PDEATHSIG``) and exits when the trainer disconnects.

Cluster mode (started by hand / by a launcher on an inference node)::

    OAPL_ENGINE_AUTHKEY=<hex> python -m oapl_megatron.entrypoints.engine_server --spec spec.json --host 0.0.0.0 --port 5555

keeps serving successive trainer connections until a ``shutdown`` request.

The authkey comes from the environment (``OAPL_ENGINE_AUTHKEY``, hex), never from the command line.
On a machine without CUDA the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): 2–3 s start
and no extra processes, instead of 15–20 s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from oapl_megatron.rollout.types import (PROTOCOL_VERSION, GenerationRequest, Reply, Request, Sample,
                                         SamplingSpec, prompt_seed_offset)

AUTHKEY_ENV = "OAPL_ENGINE_AUTHKEY"
WORKER_EXTENSION = "oapl_megatron.rollout.worker_ext.WeightSyncWorkerExtension"


@dataclass
class EngineSpec:
    """What one engine runs; written as JSON by the trainer (or by hand in cluster mode)."""

    model: str
    engine_id: int = 0
    tp: int = 1
    dtype: str = "auto"
    max_model_len: int = 4096
    kv_cache_bytes: int | None = None
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.85
    seed: int = 0

    @staticmethod
    def load(path: str | Path) -> "EngineSpec":
        data = json.loads(Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(EngineSpec)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"{path}: unknown engine spec keys {sorted(unknown)}; known: {sorted(fields)}")
        return EngineSpec(**data)


class EngineServer:
    """Owns the vLLM ``LLM`` and dispatches control-plane requests to ``op_<name>`` methods."""

    def __init__(self, spec: EngineSpec):
        from oapl_megatron.rollout.llm_factory import LLMSettings, build_llm

        self.spec = spec
        self.version = 0
        self.busy_s = 0.0
        self.llm = build_llm(LLMSettings(model=spec.model, tp=spec.tp, dtype=spec.dtype,
                                         max_model_len=spec.max_model_len, kv_cache_bytes=spec.kv_cache_bytes,
                                         enforce_eager=spec.enforce_eager, seed=spec.seed,
                                         gpu_memory_utilization=spec.gpu_memory_utilization,
                                         worker_extension_cls=WORKER_EXTENSION), label=f"engine {spec.engine_id}")

    # ---- handlers: keyword arguments of the Request; return value goes into Reply.value

    def op_ping(self) -> dict:
        return {"engine_id": self.spec.engine_id, "version": self.version, "pid": os.getpid(), "busy_s": self.busy_s}

    def op_version(self) -> int:
        return self.version

    def op_generate(self, requests: list[GenerationRequest], sampling: SamplingSpec) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        params = []
        for r in requests:
            seed = None if sampling.seed is None else (sampling.seed + prompt_seed_offset(r.prompt_id)) % (1 << 63)
            # logprobs=0: vLLM returns the log-prob of the sampled token only (raw model log-probs, i.e. before
            # temperature / top-p processing).
            params.append(SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                         max_tokens=sampling.max_tokens, seed=seed, logprobs=0, detokenize=False,
                                         stop_token_ids=list(sampling.stop_token_ids)))
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = []
        for r, out in zip(requests, outputs):
            for i, c in enumerate(out.outputs):
                lps = []
                for pos, (tok, d) in enumerate(zip(c.token_ids, c.logprobs or [])):
                    if tok not in d:
                        raise RuntimeError(f"engine {self.spec.engine_id}: prompt {r.prompt_id!r} position {pos}: "
                                           f"sampled token {tok} missing from the returned log-probs")
                    lps.append(float(d[tok].logprob))
                samples.append(Sample(prompt_id=r.prompt_id, prompt_token_ids=tuple(r.prompt_token_ids),
                                      token_ids=tuple(c.token_ids), token_logprobs=tuple(lps),
                                      finish_reason=str(c.finish_reason), policy_version=self.version,
                                      engine_id=self.spec.engine_id, sample_index=i))
        self.busy_s += time.perf_counter() - t0
        return samples

    def op_init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                             timeout_s: float) -> list[int]:
        return self.llm.collective_rpc("oapl_init_weight_group",
                                       args=(host, port, rank_offset, world_size, backend, timeout_s))

    def op_receive_weights(self, meta: dict) -> dict:
        per_worker = self.llm.collective_rpc("oapl_receive_weights", args=(meta,))
        return {k: max(w[k] for w in per_worker) for k in per_worker[0]}

    def op_commit_weights(self, version: int) -> dict:
        per_worker = self.llm.collective_rpc("oapl_commit_weights")
        t0 = time.perf_counter()
        # Stale KV blocks computed with the old weights would otherwise be reused for matching prefixes.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"engine {self.spec.engine_id}: reset_prefix_cache() failed after loading "
                               f"version {version}")
        self.version = version
        return {"load_s": max(w["load_s"] for w in per_worker), "reset_s": time.perf_counter() - t0}

    def op_abort_weights(self) -> None:
        self.llm.collective_rpc("oapl_abort_weights")

    def op_close_weight_group(self) -> None:
        self.llm.collective_rpc("oapl_close_weight_group")

    # ---- loop

    def handle(self, req) -> Reply:
        if not isinstance(req, Request):
            return Reply(ok=False, error=f"TypeError: expected a Request, got {type(req).__name__}")
        if req.protocol != PROTOCOL_VERSION:
            return Reply(ok=False, error=f"ProtocolError: client speaks protocol {req.protocol}, engine "
                                         f"{self.spec.engine_id} speaks {PROTOCOL_VERSION}")
        fn = getattr(self, f"op_{req.op}", None)
        if fn is None:
            return Reply(ok=False, error=f"ValueError: unknown op {req.op!r}")
        try:
            return Reply(ok=True, value=fn(**req.args))
        except Exception as e:
            return Reply(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())

    def serve(self, listener, once: bool) -> None:
        """Serve connections; ``once``: exit when the first connection closes (local mode)."""
        while True:
            conn = listener.accept()
            try:
                while True:
                    try:
                        req = conn.recv()
                    except (EOFError, OSError):
                        break  # the trainer went away
                    if isinstance(req, Request) and req.op == "shutdown":
                        conn.send(Reply(ok=True))
                        return
                    conn.send(self.handle(req))
            finally:
                conn.close()
            if once:
                return
