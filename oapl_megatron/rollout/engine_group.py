"""N inference engines as one: :class:`EngineGroup` starts or attaches them, spreads generation, syncs weights.

Each engine is one vLLM engine (its own TP size) in its own process, served by
:mod:`oapl_megatron.rollout.engine_server` and reached through an
:class:`~oapl_megatron.rollout.engine_client.EngineClient`. In ``local`` mode the group spawns the servers (they die with the
trainer: ``PR_SET_PDEATHSIG``); in ``cluster`` mode it attaches to servers already running at ``host:port``
(``rollout.addresses``) or, without addresses, to the servers that registered in ``<log_dir>/registry``.

Use::

    with EngineGroup(model_dir, RolloutConfig(engines=2, ...), WeightSyncConfig()) as engines:
        samples = engines.generate([GenerationRequest(pid, ids), ...], SamplingSpec(n=8, max_tokens=512))
        fut = engines.submit(requests, sampling)        # non-blocking: keep generating while training
        ...train...
        report = engines.sync_weights(hf_named_tensors, gather_s=t_gather)   # waits for in-flight generation
        samples = fut.result()                          # each Sample carries its policy_version

Control plane: every request has a timeout and every error names the engine (id, pid or address) and the op.
Requests to one engine are serialized on one connection by a single-thread executor, so a generate and a weight
update never interleave on an engine. Shutdown (``shutdown()``, ``with``, ``atexit``, SIGTERM/SIGINT) stops every
engine: polite request → SIGTERM → SIGKILL of its whole process group; no orphan engine processes.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import threading
import time
import json
from concurrent.futures import Future
from pathlib import Path
from typing import Iterable, Sequence

import torch

from oapl_megatron.config.rollout import RolloutConfig, WeightSyncConfig
from oapl_megatron.rollout.engine_client import EngineClient, EngineError
from oapl_megatron.rollout.engine_process import engine_spec, register_group, spawn_engine_server, unregister_group
from oapl_megatron.rollout.engine_server import AUTHKEY_ENV
from oapl_megatron.rollout.types import GenerationRequest, Sample, SamplingSpec
from oapl_megatron.weight_sync.bucket import TensorMeta
from oapl_megatron.weight_sync.sync import SyncError, SyncHooks, SyncReport, run_sync
from oapl_megatron.weight_sync.transport import TransportError, WeightGroup, make_sender, open_rendezvous, resolve_backend


class EngineGroup:
    """N engines: start, balanced generation (blocking or non-blocking), weight sync, shutdown."""

    def __init__(self, model: str, rollout: RolloutConfig, weight_sync: WeightSyncConfig | None = None,
                 log_dir: str | Path | None = None, authkey: bytes | None = None,
                 engine_devices: Sequence[str | None] | None = None):
        """``engine_devices[i]``: CUDA_VISIBLE_DEVICES of local engine i (None = the trainer's environment)."""
        self.model = str(model)
        self.cfg = rollout
        self.sync_cfg = weight_sync or WeightSyncConfig()
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="oapl_engines_"))
        if authkey is None and rollout.mode == "cluster":
            # Engine servers started elsewhere (e.g. by the Slurm batch script) share the key through the environment.
            key_hex = os.environ.get(AUTHKEY_ENV)
            if not key_hex:
                raise ValueError(f"rollout.mode=cluster: set {AUTHKEY_ENV} (hex) to the engine servers' authkey")
            authkey = bytes.fromhex(key_hex)
        self.authkey = authkey or secrets.token_bytes(32)
        self.engine_devices = list(engine_devices) if engine_devices is not None else [None] * rollout.engines
        if len(self.engine_devices) != rollout.engines:
            raise ValueError(f"engine_devices has {len(self.engine_devices)} entries for rollout.engines={rollout.engines}")
        self.engines: list[EngineClient] = []
        self.version = 0
        self._group: WeightGroup | None = None
        self._group_broken: str | None = None
        self._closed = False
        # Held by a weight sync from its drain to its end: generate/submit calls from other threads (a rollout
        # producer) wait here instead of queueing work in front of an engine's receive.
        self._gate = threading.Lock()

    # ---- lifecycle

    def start(self) -> "EngineGroup":
        register_group(self)
        try:
            if self.cfg.mode == "local":
                self._start_local()
            else:
                self._attach_cluster()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _start_local(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pending = []
        for i in range(self.cfg.engines):
            spec = engine_spec(self.model, self.cfg, i)
            proc, ready, log = spawn_engine_server(spec, self.log_dir, self.authkey,
                                                   cuda_visible_devices=self.engine_devices[i])
            pending.append((i, proc, ready, log))
            # Registered before it is ready, so a failure of a later engine still stops this one.
            self.engines.append(EngineClient(i, ("127.0.0.1", 0), self.authkey, self.cfg.engine_tp, proc=proc,
                                             log_path=log, control_timeout_s=self.cfg.control_timeout_s,
                                             request_timeout_s=self.cfg.request_timeout_s))
        deadline = time.monotonic() + self.cfg.start_timeout_s
        for (i, proc, ready, log), client in zip(pending, self.engines):
            while not ready.exists():
                if proc.poll() is not None:
                    raise EngineError(f"{client.describe()} exited with code {proc.returncode} while starting"
                                      f"{client._log_tail(30)}", i, "start")
                if time.monotonic() > deadline:
                    raise EngineError(f"{client.describe()} not ready within {self.cfg.start_timeout_s:.0f}s"
                                      f"{client._log_tail(30)}", i, "start")
                time.sleep(0.2)
            info = json.loads(ready.read_text())
            client.address = (info["host"], int(info["port"]))
            client.connect(max(1.0, deadline - time.monotonic()))

    def _registered_addresses(self) -> list[str]:
        """Wait (≤ rollout.start_timeout_s) until every engine has written ``<log_dir>/registry/engine<i>.json``
        (the engine server's ``--register-dir``); the error names the engines that never registered."""
        registry = self.log_dir / "registry"
        deadline = time.monotonic() + self.cfg.start_timeout_s
        files = [registry / f"engine{i}.json" for i in range(self.cfg.engines)]
        while not all(f.exists() for f in files):
            if time.monotonic() > deadline:
                missing = [i for i, f in enumerate(files) if not f.exists()]
                raise EngineError(f"engines {missing} did not register in {registry} within "
                                  f"{self.cfg.start_timeout_s:.0f}s (rollout.start_timeout_s); see their logs",
                                  missing[0], "register")
            time.sleep(0.5)
        infos = [json.loads(f.read_text()) for f in files]
        print(f"[engines] registered: " + ", ".join(f"engine {i} at {d['host']}:{d['port']} (pid {d['pid']})"
                                                    for i, d in enumerate(infos)), flush=True)
        return [f"{d['host']}:{d['port']}" for d in infos]

    def _attach_cluster(self) -> None:
        addresses = self.cfg.addresses or self._registered_addresses()
        for i, addr in enumerate(addresses):
            host, _, port = addr.rpartition(":")
            client = EngineClient(i, (host, int(port)), self.authkey, self.cfg.engine_tp,
                                  control_timeout_s=self.cfg.control_timeout_s,
                                  request_timeout_s=self.cfg.request_timeout_s)
            self.engines.append(client)
            client.connect(self.cfg.start_timeout_s)
        versions = {c.engine_id: c.version() for c in self.engines}
        if len(set(versions.values())) > 1:
            raise EngineError(f"attached engines serve different weight versions {versions}; restart them", -1,
                              "attach")
        self.version = next(iter(versions.values()))

    def shutdown(self) -> None:
        """Stop every engine (idempotent; safe from atexit and signal handlers)."""
        if self._closed:
            return
        self._closed = True
        if self._group is not None:
            self._group.close()
            self._group = None
        for c in self.engines:
            try:
                c.close()
            except Exception as e:  # keep stopping the others
                print(f"warning: stopping {c.describe()}: {e}", file=sys.stderr)
        unregister_group(self)

    def __enter__(self) -> "EngineGroup":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- generation

    def _split(self, requests: Sequence[GenerationRequest]) -> list[tuple[EngineClient, list[int]]]:
        """Near-equal contiguous chunks, the bigger ones to the engines with the least queued work."""
        n = len(self.engines)
        order = sorted(self.engines, key=lambda c: c.outstanding_prompts)
        base, extra = divmod(len(requests), n)
        out, start = [], 0
        for k, c in enumerate(order):
            size = base + (1 if k < extra else 0)
            if size:
                out.append((c, list(range(start, start + size))))
            start += size
        return out

    def submit(self, requests: Sequence[GenerationRequest], sampling: SamplingSpec) -> Future:
        """Non-blocking: spread ``requests`` over the engines; the Future resolves to ``list[Sample]`` in request
        order (``sampling.n`` consecutive samples per prompt)."""
        self._check_open()
        requests = list(requests)
        with self._gate:
            parts = [(idx, c.submit_generate([requests[i] for i in idx], sampling))
                     for c, idx in self._split(requests)]
        result: Future = Future()
        lock = threading.Lock()
        remaining = [len(parts)]

        def on_done(_):
            with lock:
                remaining[0] -= 1
                if remaining[0] or result.done():
                    return
            errors = [f.exception() for _, f in parts if f.exception() is not None]
            if errors:
                result.set_exception(errors[0])
                return
            by_prompt: dict[int, list[Sample]] = {}
            for idx, f in parts:
                samples = f.result()
                for j, i in enumerate(idx):
                    by_prompt[i] = samples[j * sampling.n:(j + 1) * sampling.n]
            result.set_result([s for i in range(len(requests)) for s in by_prompt[i]])

        if not parts:
            result.set_result([])
        for _, f in parts:
            f.add_done_callback(on_done)
        return result

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingSpec) -> list[Sample]:
        return self.submit(requests, sampling).result()

    def utilization(self) -> dict[int, dict]:
        """Per engine: busy seconds, wall seconds since start, idle fraction."""
        return {c.engine_id: c.utilization() for c in self.engines}

    def versions(self) -> dict[int, int]:
        return {c.engine_id: c.version() for c in self.engines}

    # ---- weight sync

    def init_weight_group(self) -> None:
        """Form the data-plane group: the trainer (this process) is rank 0, engine e's workers follow."""
        self._check_open()
        if self._group is not None:
            return
        cfg = self.sync_cfg
        backend = resolve_backend(cfg.backend)
        world = 1 + sum(c.tp for c in self.engines)
        store = open_rendezvous(cfg.host, 0, world, cfg.timeout_s)
        port = store.port
        futs, offset = [], 1
        for c in self.engines:
            futs.append((c, c.init_weight_group(cfg.host, port, offset, world, backend, cfg.timeout_s)))
            offset += c.tp
        try:
            self._group = WeightGroup.join(cfg.host, port, 0, world, backend, cfg.timeout_s, store=store)
        except TransportError as e:
            dead = [c.describe() for c, _ in futs if not c.alive()]
            raise SyncError(f"weight group did not form{' (dead: ' + ', '.join(dead) + ')' if dead else ''}: {e}",
                            None, "init") from e
        for c, f in futs:
            try:
                f.result(timeout=cfg.timeout_s + 60)
            except Exception as e:
                raise SyncError(f"{c.describe()}: joining the weight group failed: {e}", c.engine_id, "init") from e
        self._sender = make_sender(self._group)

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], gather_s: float = 0.0,
                     metas: Sequence[TensorMeta] | None = None, hooks: SyncHooks | None = None,
                     version: int | None = None) -> SyncReport:
        """Push full HF-named tensors to every engine; on success all engines serve ``version`` (default
        ``self.version + 1``; a resumed run passes the version it restored, which must be newer than the engines').

        Waits (≤ ``rollout.request_timeout_s``) for in-flight generation first; generate/submit calls from other
        threads block until the sync is over, so every request runs entirely on one weight version. See
        :func:`oapl_megatron.weight_sync.sync.run_sync` for phases, errors and what state a failure leaves.
        """
        self._check_open()
        target = self.version + 1 if version is None else version
        if target <= self.version:
            raise ValueError(f"sync to policy version {target}: the engines already serve version {self.version}")
        if self._group_broken:
            raise SyncError(f"the weight-sync group is broken ({self._group_broken}); restart the engines", None,
                            "init")
        with self._gate:  # no new generation starts until this sync is over
            for c in self.engines:
                c.drain(self.cfg.request_timeout_s)
            self.init_weight_group()
            try:
                report = run_sync(self._sender, self.engines, named_tensors, version=target,
                                  bucket_bytes=self.sync_cfg.bucket_mb * 2**20,
                                  verify=self.sync_cfg.verify_checksums, timeout_s=self.sync_cfg.timeout_s,
                                  gather_s=gather_s, metas=metas, hooks=hooks)
            except SyncError as e:
                if e.phase != "verify":  # after a clean abort the group is still in step; otherwise it is not
                    self._group_broken = str(e)
                raise
            self.version = report.version
            return report

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EngineGroup is shut down")
        if not self.engines:
            raise RuntimeError("EngineGroup.start() has not been called")
