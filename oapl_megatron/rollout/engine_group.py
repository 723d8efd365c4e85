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

Faults are local to an engine: a heartbeat monitor (:mod:`oapl_megatron.rollout.liveness`) declares an engine dead
when its process exits or it stops answering; its in-flight requests are re-issued to the live engines (exactly
once, :mod:`oapl_megatron.rollout.reissue`), it is restarted in the background (local: respawned with the same
devices; cluster: re-attached, bounded wait) and resynced to the current weights before it generates again. A sync
during which an engine dies completes for the others. ``fault_counters()`` counts failures, restarts and re-issues.

Control plane: every request has a timeout and every error names the engine (id, pid or address) and the op.
Requests to one engine are serialized on one connection by a single-thread executor, so a generate and a weight
update never interleave on an engine. Shutdown (``shutdown()``, ``with``, ``atexit``, SIGTERM/SIGINT) stops every
engine: polite request → SIGTERM → SIGKILL of its whole process group; no orphan engine processes.
"""

from __future__ import annotations

import gc
import os
import queue
import secrets
import sys
import tempfile
import threading
import time
import json
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from oapl_megatron.config.rollout import RolloutConfig, WeightSyncConfig
from oapl_megatron.rollout.engine_client import EngineClient, EngineError
from oapl_megatron.rollout import fault_injection
from oapl_megatron.rollout.engine_process import engine_spec, register_group, spawn_engine_server, unregister_group
from oapl_megatron.rollout.engine_server import AUTHKEY_ENV
from oapl_megatron.rollout.liveness import LivenessMonitor
from oapl_megatron.rollout.reissue import Ledger
from oapl_megatron.rollout.types import GenerationRequest, Sample, SamplingSpec
from oapl_megatron.weight_sync.bucket import TensorMeta
from oapl_megatron.weight_sync.sync import SyncError, SyncHooks, SyncReport, run_sync
from oapl_megatron.weight_sync.transport import TransportError, WeightGroup, make_sender, open_rendezvous, resolve_backend


class NoEngineError(EngineError):
    """No engine was live for ``rollout.no_engine_timeout_s`` (or none can come back): generation cannot go on."""


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
        # fault tolerance: which engines take work, the calls in flight, restarts, the data plane's one user
        self._cv = threading.Condition(threading.RLock())
        self._live: set[int] = set()
        self._incarnation = [0] * rollout.engines  # restarts of each engine
        self._restarting: set[int] = set()
        self._calls: set[_Call] = set()
        self._sync_lock = threading.RLock()  # group formation + run_sync: the regular sync or a restart's resync
        self._members: tuple | None = None  # (engine_id, incarnation) of the current weight group's receivers
        self._weights: list[tuple[str, torch.Tensor]] | None = None  # copy of version self.version (keep_weights_copy)
        self._monitor: LivenessMonitor | None = None
        self._restarts: "queue.Queue[int | None]" = queue.Queue()
        self._supervisor: threading.Thread | None = None
        self.counters = {"engine_failures": 0, "engine_restarts": 0, "reissued_groups": 0,
                         "restarted_engine_prompts": 0}

    # ---- lifecycle

    def start(self) -> "EngineGroup":
        register_group(self)
        try:
            if self.cfg.mode == "local":
                self._start_local()
            else:
                self._attach_cluster()
            self._start_fault_handling()
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
        with self._cv:
            self._cv.notify_all()
        if self._monitor is not None:
            self._monitor.stop()
        self._restarts.put(None)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(30.0)  # a respawn in progress registers its client before we stop them all
        for call in list(self._calls):
            call.fail(RuntimeError("EngineGroup is shut down"))
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

    def _split(self, clients: Sequence[EngineClient], indexes: list[int]) -> list[tuple[EngineClient, list[int]]]:
        """Near-equal contiguous chunks of ``indexes``, the bigger ones to the engines with the least queued work."""
        n = len(clients)
        order = sorted(clients, key=lambda c: c.outstanding_prompts)
        base, extra = divmod(len(indexes), n)
        out, start = [], 0
        for k, c in enumerate(order):
            size = base + (1 if k < extra else 0)
            if size:
                out.append((c, indexes[start:start + size]))
            start += size
        return out

    def submit(self, requests: Sequence[GenerationRequest], sampling: SamplingSpec) -> Future:
        """Non-blocking (unless no engine is live: then it waits for one): spread ``requests`` over the live
        engines; the Future resolves to ``list[Sample]`` in request order (``sampling.n`` consecutive samples per
        prompt). Requests of an engine that dies are re-issued to the others; the Future fails only on an engine's
        reply error or when no engine is live for ``rollout.no_engine_timeout_s`` (:class:`NoEngineError`)."""
        self._check_open()
        call = _Call(Ledger(len(requests), sampling.n), list(requests), sampling, Future())
        if not call.requests:
            call.result.set_result([])
            return call.result
        with self._cv:
            self._calls.add(call)
        call.result.add_done_callback(lambda _: self._forget(call))
        self._dispatch(call, list(range(len(call.requests))))
        return call.result

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingSpec) -> list[Sample]:
        return self.submit(requests, sampling).result()

    def utilization(self) -> dict[int, dict]:
        """Per engine: busy seconds, wall seconds since start, idle fraction."""
        return {c.engine_id: c.utilization() for c in self.engines}

    def versions(self) -> dict[int, int]:
        """Weight version of every live engine."""
        return {c.engine_id: c.version() for c in self._live_clients()}

    # ---- weight sync

    def init_weight_group(self, members: Sequence[EngineClient] | None = None) -> None:
        """Form the data-plane group: the trainer (this process) is rank 0, the workers of ``members`` (default: the
        live engines) follow. Kept while the members stay the same; re-formed when they change (an engine died or
        came back) or after a failed broadcast left the group out of step."""
        self._check_open()
        members = list(self._live_clients() if members is None else members)
        key = tuple((c.engine_id, self._incarnation[c.engine_id]) for c in members)
        if self._group is not None and self._members == key and not self._group_broken:
            return
        self._drop_group()
        cfg = self.sync_cfg
        backend = resolve_backend(cfg.backend)
        world = 1 + sum(c.tp for c in members)
        store = open_rendezvous(cfg.host, 0, world, cfg.timeout_s)
        port = store.port
        futs, offset = [], 1
        for c in members:
            futs.append((c, c.init_weight_group(cfg.host, port, offset, world, backend, cfg.timeout_s)))
            offset += c.tp
        try:
            group = WeightGroup.join(cfg.host, port, 0, world, backend, cfg.timeout_s, store=store)
        except TransportError as e:
            dead = [c.describe() for c, _ in futs if not c.alive()]
            raise SyncError(f"weight group did not form{' (dead: ' + ', '.join(dead) + ')' if dead else ''}: {e}",
                            next((c.engine_id for c, _ in futs if not c.alive()), None), "init") from e
        for c, f in futs:
            try:
                f.result(timeout=cfg.timeout_s + 60)
            except Exception as e:
                group.close()
                raise SyncError(f"{c.describe()}: joining the weight group failed: {e}", c.engine_id, "init") from e
        self._group, self._members, self._group_broken = group, key, None
        self._sender = make_sender(self._group)

    def _drop_group(self, collect: bool = False) -> None:
        """Release the trainer's end of the weight group (the receivers replace theirs when they join the next one).
        ``collect``: after a failed broadcast, run the garbage collector so the gloo context is destroyed now: that
        closes its sockets, which is what makes the other receivers' pending receives fail fast."""
        if self._group is not None:
            self._group.close()
        self._group, self._members, self._sender = None, None, None
        if collect:
            gc.collect()

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], gather_s: float = 0.0,
                     metas: Sequence[TensorMeta] | None = None, hooks: SyncHooks | None = None,
                     version: int | None = None) -> SyncReport:
        """Push full HF-named tensors to every live engine; on success they all serve ``version`` (default
        ``self.version + 1``; a resumed run passes the version it restored, which must be newer than the engines').

        Waits (≤ ``rollout.request_timeout_s``) for in-flight generation first; generate/submit calls from other
        threads block until the sync is over, so every request runs entirely on one weight version. See
        :func:`oapl_megatron.weight_sync.sync.run_sync` for phases, errors and what state a failure leaves.

        An engine that dies during the sync is declared dead (and restarted, resynced on return) and the sync is
        run again for the others, from the tensors already streamed plus the rest of the stream (when none is left,
        for the first that comes back, ≤ ``rollout.no_engine_timeout_s``); an integrity failure (checksum mismatch,
        every engine alive) is raised.
        """
        self._check_open()
        target = self.version + 1 if version is None else version
        if target <= self.version:
            raise ValueError(f"sync to policy version {target}: the engines already serve version {self.version}")
        if self._group_broken and not self.cfg.restart_engines:
            raise SyncError(f"the weight-sync group is broken ({self._group_broken}); restart the engines", None,
                            "init")
        source = _Replay(named_tensors, host_copy=self.cfg.keep_weights_copy)
        hooks = hooks or fault_injection.sync_hooks(target)
        with self._gate:  # no new generation starts until this sync is over
            while True:
                self._wait_for_live_engine(f"weight sync to version {target}")
                with self._sync_lock:
                    members = self._live_clients()
                    for c in members:
                        c.drain(self.cfg.request_timeout_s)
                    try:
                        self.init_weight_group(members)
                        report = run_sync(self._sender, members, source.replay(), version=target,
                                          bucket_bytes=self.sync_cfg.bucket_mb * 2**20,
                                          verify=self.sync_cfg.verify_checksums, timeout_s=self.sync_cfg.timeout_s,
                                          gather_s=gather_s, metas=metas, hooks=hooks)
                    except SyncError as e:
                        if e.phase != "verify":  # after a clean abort the group is still in step; otherwise it is not
                            self._group_broken = str(e)
                        dead = [c for c in members if c.broken or not c.alive()]
                        if not dead or not self.cfg.restart_engines or not source.replayable:
                            raise
                        failure = str(e)
                    else:
                        self.version = report.version
                        if self.cfg.keep_weights_copy:
                            self._weights = source.copy()
                        return report
                    # Out of the except block: the error's traceback holds the sender's pending broadcasts, and only
                    # destroying the trainer's end of the group makes the survivors' receives fail at once (instead
                    # of after weight_sync.timeout_s).
                    self._drop_group(collect=True)
                    for c in dead:
                        self.engine_failed(c.engine_id, f"died during the weight sync to version {target}: {failure}",
                                           client=c)
                    print(f"[engines] weight sync to version {target}: "
                          f"{', '.join(c.describe() for c in dead)} died; syncing the others again",
                          file=sys.stderr, flush=True)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EngineGroup is shut down")
        if not self.engines:
            raise RuntimeError("EngineGroup.start() has not been called")

    # ---- fault tolerance

    def fault_counters(self) -> dict[str, int]:
        """engine_failures, engine_restarts, reissued_groups (prompts re-sent after their engine died) and
        restarted_engine_prompts (prompts generated by an engine after a restart), and live_engines."""
        with self._cv:
            return {**self.counters, "live_engines": len(self._live)}

    def _live_clients(self) -> list[EngineClient]:
        with self._cv:
            return [self.engines[i] for i in sorted(self._live)]

    def _start_fault_handling(self) -> None:
        with self._cv:
            self._live = set(range(len(self.engines)))
        self._monitor = LivenessMonitor(self._on_silent, self.cfg.heartbeat_interval_s,
                                        self.cfg.liveness_timeout_s).start()
        for c in self.engines:
            self._watch(c)
        # One long-lived thread spawns every replacement engine: PR_SET_PDEATHSIG fires when the *spawning thread*
        # exits, so a short-lived restart thread would take its engine down with it.
        self._supervisor = threading.Thread(target=self._supervise, name="engine-supervisor", daemon=True)
        self._supervisor.start()

    def _watch(self, c: EngineClient) -> None:
        if c.heartbeat_port is None:
            print(f"warning: {c.describe()} reports no heartbeat port (an older server?): only failed requests and "
                  "its exit show its death", file=sys.stderr, flush=True)
            return
        self._monitor.watch(c.engine_id, (c.address[0], c.heartbeat_port), self.authkey, c.proc)

    def _on_silent(self, engine_id: int, reason: str) -> None:
        self.engine_failed(engine_id, reason)

    def engine_failed(self, engine_id: int, reason: str, client: EngineClient | None = None) -> None:
        """Declare engine ``engine_id`` dead (idempotent; ``client``: only if it is still that incarnation): stop
        using it, re-issue its in-flight requests to the live engines, and queue its restart."""
        with self._cv:
            c = self.engines[engine_id]
            if self._closed or engine_id not in self._live or (client is not None and client is not c):
                return
            self._live.discard(engine_id)
            self.counters["engine_failures"] += 1
            calls = list(self._calls)
            key = (engine_id, self._incarnation[engine_id])
            restart = self.cfg.restart_engines and self._incarnation[engine_id] < self.cfg.max_restarts
            if restart:
                self._restarting.add(engine_id)
            self._cv.notify_all()
        if self._monitor is not None:
            self._monitor.unwatch(engine_id)
        print(f"[engines] {c.describe()} declared dead: {reason}; "
              f"{'restarting it' if restart else 'not restarted (rollout.max_restarts reached or restarts off)'}",
              file=sys.stderr, flush=True)
        c.abandon(reason)
        for call in calls:
            self._reissue(call, call.ledger.abandon_engine(key))
        if restart:
            self._restarts.put(engine_id)

    def _reissue(self, call: "_Call", indexes: list[int]) -> None:
        if not indexes or call.result.done():
            return
        with self._cv:
            self.counters["reissued_groups"] += len(indexes)
        # Not on this thread: it may be a dead engine's executor or the monitor, and a dispatch may wait for a
        # weight sync to end (the gate) or for an engine to come back.
        threading.Thread(target=self._dispatch, args=(call, indexes), name="reissue", daemon=True).start()

    def _wait_for_live_engine(self, what: str) -> None:
        """Block until an engine is live; EngineError after ``rollout.no_engine_timeout_s`` or when none can return."""
        deadline = time.monotonic() + self.cfg.no_engine_timeout_s
        with self._cv:
            while not self._live:
                if self._closed:
                    raise RuntimeError("EngineGroup is shut down")
                left = deadline - time.monotonic()
                if not self._restarting:
                    raise NoEngineError(f"{what}: no live engine and none restarting (rollout.restart_engines off "
                                        f"or rollout.max_restarts={self.cfg.max_restarts} reached); engine failures "
                                        f"so far: {self.counters['engine_failures']}", -1, "generate")
                if left <= 0:
                    raise NoEngineError(f"{what}: no live engine for {self.cfg.no_engine_timeout_s:.0f}s "
                                        f"(rollout.no_engine_timeout_s), engines {sorted(self._restarting)} still "
                                        f"restarting; engine failures so far: {self.counters['engine_failures']}",
                                        -1, "generate")
                self._cv.wait(min(left, 1.0))

    def _dispatch(self, call: "_Call", indexes: list[int]) -> None:
        """Send ``indexes`` of ``call`` to the live engines (waiting for one if none is live)."""
        try:
            while True:
                self._wait_for_live_engine("generate")
                with self._gate:  # queued before a weight sync drains the engines, or after it ends
                    live = self._live_clients()
                    if not live:
                        continue  # the last one died meanwhile
                    for c, part in self._split(live, indexes):
                        key = (c.engine_id, self._incarnation[c.engine_id])
                        attempt = call.ledger.assign(key, part)
                        try:
                            fut = c.submit_generate([call.requests[i] for i in part], call.sampling)
                        except RuntimeError:  # its executor was shut down: it was declared dead meanwhile
                            self._reissue(call, call.ledger.abandon(attempt))
                            continue
                        fut.add_done_callback(lambda f, a=attempt, c=c: self._on_part_done(call, a, c, f))
                    return
        except BaseException as e:
            call.fail(e)

    def _on_part_done(self, call: "_Call", attempt: int, c: EngineClient, fut: Future) -> None:
        exc = CancelledError() if fut.cancelled() else fut.exception()
        if exc is None:
            if call.ledger.complete(attempt, fut.result()) and self._incarnation[c.engine_id] > 0:
                with self._cv:
                    self.counters["restarted_engine_prompts"] += len(fut.result()) // call.sampling.n
            if call.ledger.done() and not call.result.done():
                try:
                    call.result.set_result(call.ledger.results())
                except Exception:  # InvalidStateError: failed meanwhile by a shutdown
                    pass
            return
        if isinstance(exc, CancelledError) or c.broken or not c.alive():  # the engine failed, not the request
            self.engine_failed(c.engine_id, str(exc) or type(exc).__name__, client=c)
            self._reissue(call, call.ledger.abandon(attempt))
            return
        call.fail(exc)  # the engine answered with an error: a bad request, not a dead engine

    def _forget(self, call: "_Call") -> None:
        with self._cv:
            self._calls.discard(call)

    # ---- restarts (the supervisor thread)

    def _supervise(self) -> None:
        while True:
            engine_id = self._restarts.get()
            if engine_id is None or self._closed:
                return
            try:
                self._restart(engine_id)
            except Exception as e:
                if self._closed:
                    return
                with self._cv:
                    again = (not self._closed and self._incarnation[engine_id] < self.cfg.max_restarts)
                    self._incarnation[engine_id] += 1  # a failed restart counts against max_restarts
                    if not again:
                        self._restarting.discard(engine_id)
                    self._cv.notify_all()
                print(f"[engines] restarting engine {engine_id} failed: {e}"
                      f"{'; trying again' if again else '; leaving it dead'}", file=sys.stderr, flush=True)
                if again:
                    time.sleep(1.0)
                    self._restarts.put(engine_id)

    def _restart(self, engine_id: int) -> None:
        """Bring engine ``engine_id`` back (respawn or re-attach), resync the current weights, then make it live."""
        t0 = time.monotonic()
        c = self._respawn(engine_id) if self.cfg.mode == "local" else self._reattach(engine_id)
        try:
            with self._sync_lock:  # no regular sync runs meanwhile: the version and its copy stay consistent
                served = c.version()
                if served != self.version:
                    if self._weights is None:
                        raise EngineError(f"{c.describe()} serves version {served}, the group {self.version}, and "
                                          "no copy of the current weights is kept (rollout.keep_weights_copy=false)",
                                          engine_id, "resync")
                    self.init_weight_group([c])
                    run_sync(self._sender, [c], iter(self._weights), version=self.version,
                             bucket_bytes=self.sync_cfg.bucket_mb * 2**20, verify=self.sync_cfg.verify_checksums,
                             timeout_s=self.sync_cfg.timeout_s)
                with self._cv:
                    if self._closed:
                        raise RuntimeError("EngineGroup is shut down")
                    self._incarnation[engine_id] += 1
                    self.engines[engine_id] = c
                    self._live.add(engine_id)
                    self._restarting.discard(engine_id)
                    self.counters["engine_restarts"] += 1
                    self._cv.notify_all()
        except BaseException:
            c.abandon("restart failed")
            raise
        self._watch(c)
        print(f"[engines] {c.describe()} is back after {time.monotonic() - t0:.1f}s, serving version {self.version}",
              file=sys.stderr, flush=True)

    def _respawn(self, engine_id: int) -> EngineClient:
        old = self.engines[engine_id]
        spec = engine_spec(self.model, self.cfg, engine_id)
        proc, ready, log = spawn_engine_server(spec, self.log_dir, self.authkey,
                                               cuda_visible_devices=self.engine_devices[engine_id])
        c = EngineClient(engine_id, ("127.0.0.1", 0), self.authkey, self.cfg.engine_tp, proc=proc, log_path=log,
                         control_timeout_s=self.cfg.control_timeout_s, request_timeout_s=self.cfg.request_timeout_s)
        try:
            deadline = time.monotonic() + self.cfg.restart_timeout_s
            while not ready.exists():
                if proc.poll() is not None or self._closed or time.monotonic() > deadline:
                    raise EngineError(f"{c.describe()} (replacing {old.describe()}) did not start: "
                                      f"{'exited ' + str(proc.returncode) if proc.poll() is not None else 'timeout'}"
                                      f"{c._log_tail(20)}", engine_id, "restart")
                time.sleep(0.2)
            info = json.loads(ready.read_text())
            c.address = (info["host"], int(info["port"]))
            c.connect(max(1.0, deadline - time.monotonic()))
        except BaseException:
            c.abandon("restart failed")
            raise
        return c

    def _reattach(self, engine_id: int) -> EngineClient:
        old = self.engines[engine_id]
        c = EngineClient(engine_id, old.address, self.authkey, self.cfg.engine_tp,
                         control_timeout_s=self.cfg.control_timeout_s, request_timeout_s=self.cfg.request_timeout_s)
        # connect() cannot bound the authentication handshake with a server that accepts but does not answer (a
        # stopped process): wait for it on a helper thread instead
        done: Future = Future()
        threading.Thread(target=lambda: _settle(done, c.connect, self.cfg.restart_timeout_s), daemon=True).start()
        try:
            done.result(timeout=self.cfg.restart_timeout_s + 5.0)
        except BaseException as e:
            c.abandon("re-attach failed")
            raise EngineError(f"{c.describe()}: did not come back within {self.cfg.restart_timeout_s:.0f}s "
                              f"(rollout.restart_timeout_s): {e}", engine_id, "restart") from e
        return c


def _settle(fut: Future, fn, *args) -> None:
    try:
        fut.set_result(fn(*args))
    except BaseException as e:
        fut.set_exception(e)


@dataclass(eq=False)
class _Call:
    """One submit(): its requests, their ledger, and the Future handed to the caller."""

    ledger: Ledger
    requests: list[GenerationRequest]
    sampling: SamplingSpec
    result: Future

    def fail(self, exc: BaseException) -> None:
        if not self.result.done():
            try:
                self.result.set_exception(exc)
            except Exception:  # InvalidStateError: completed meanwhile
                pass


class _Replay:
    """A weight stream that can be sent again (a sync retried after an engine died in it).

    ``host_copy`` (rollout.keep_weights_copy): tensors are recorded as host copies as they are pulled, and
    :meth:`replay` yields the recorded ones, then the rest of the stream; the copies outlive later training steps and
    become the kept copy of the version (a restarted engine is resynced from it). The cost is one host copy of the
    model on the trainer's rank 0 (and, on GPU, one device-to-host copy of every tensor per sync). Without it nothing
    is recorded — the sender keeps only the buckets in flight, as the streaming sync intends — and a sync cannot be
    replayed: an engine death during it fails the sync, as before fault tolerance."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]], host_copy: bool):
        self._it = iter(named_tensors)
        self._host_copy = host_copy
        self._seen: list[tuple[str, torch.Tensor]] = []
        self._started = False

    @property
    def replayable(self) -> bool:
        return self._host_copy

    def replay(self):
        if self._started and not self._host_copy:
            raise RuntimeError("this weight stream was not recorded (rollout.keep_weights_copy=false): it cannot be "
                               "sent again")
        self._started = True
        yield from list(self._seen)
        for name, t in self._it:
            if self._host_copy:
                self._seen.append((name, t.detach().to("cpu", copy=True)))
            yield name, t

    def copy(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._seen)
