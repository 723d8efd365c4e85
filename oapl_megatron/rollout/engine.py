"""Inference engines as seen by the trainer: :class:`EngineClient` (one engine) and :class:`EngineGroup` (N).

Each engine is one vLLM engine (its own TP size) in its own process, served by
:mod:`oapl_megatron.rollout.engine_server`. In ``local`` mode the group spawns the servers (they die with the
trainer: ``PR_SET_PDEATHSIG``); in ``cluster`` mode it attaches to servers already running at ``host:port``.

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

import atexit
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from multiprocessing.connection import Client
from pathlib import Path
from typing import Iterable, Sequence

import torch

from oapl_megatron.config.rollout import RolloutConfig, WeightSyncConfig
from oapl_megatron.rollout.engine_server import AUTHKEY_ENV, EngineSpec
from oapl_megatron.rollout.types import PROTOCOL_VERSION, GenerationRequest, Reply, Request, Sample, SamplingSpec
from oapl_megatron.weight_sync.bucket import TensorMeta
from oapl_megatron.weight_sync.sync import SyncError, SyncHooks, SyncMeta, SyncReport, run_sync
from oapl_megatron.weight_sync.transport import (TransportError, WeightGroup, make_sender, open_rendezvous,
                                                 resolve_backend)


class EngineError(RuntimeError):
    """A control-plane request to one engine failed; ``engine_id`` and ``op`` say which."""

    def __init__(self, message: str, engine_id: int, op: str):
        super().__init__(message)
        self.engine_id = engine_id
        self.op = op


class EngineClient:
    """Control-plane client of one engine server. Thread-safe; requests run one at a time in order.

    Also the :class:`~oapl_megatron.weight_sync.sync.SyncTarget` of that engine.
    """

    def __init__(self, engine_id: int, address: tuple[str, int], authkey: bytes, tp: int,
                 proc: subprocess.Popen | None = None, log_path: Path | None = None,
                 control_timeout_s: float = 120.0, request_timeout_s: float = 3600.0):
        self.engine_id = engine_id
        self.address = address
        self.tp = tp
        self.proc = proc
        self.log_path = log_path
        self.control_timeout_s = control_timeout_s
        self.request_timeout_s = request_timeout_s
        self._authkey = authkey
        self._conn = None
        self._lock = threading.Lock()
        self._broken: str | None = None  # set when the connection can no longer be trusted
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine{engine_id}")
        self._outstanding: set[Future] = set()
        self._outstanding_prompts = 0
        self._busy_s = 0.0
        self._t_start = time.perf_counter()

    # ---- identity / liveness

    def describe(self) -> str:
        where = f"pid {self.proc.pid}" if self.proc is not None else f"{self.address[0]}:{self.address[1]}"
        return f"engine {self.engine_id} ({where})"

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self._broken is None

    def _death_note(self) -> str:
        if self.proc is not None and self.proc.poll() is not None:
            return f"; the engine process exited with code {self.proc.returncode}" + self._log_tail()
        return ""

    def _log_tail(self, n: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(lines)

    # ---- connection

    def connect(self, timeout_s: float) -> None:
        """Connect (retrying until ``timeout_s``: a cluster-mode server may still be starting) and ping."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                self._conn = Client(self.address, authkey=self._authkey)
                break
            except (ConnectionRefusedError, OSError) as e:
                last = e
                time.sleep(0.5)
        if self._conn is None:
            raise EngineError(f"{self.describe()}: could not connect to {self.address[0]}:{self.address[1]} within "
                              f"{timeout_s:.0f}s ({last}){self._death_note()}", self.engine_id, "connect")
        info = self.call("ping", max(1.0, deadline - time.monotonic()))
        if info["engine_id"] != self.engine_id:
            # Samples are tagged with the server's id: it must be this client's position in the group.
            raise EngineError(f"{self.describe()}: the server at {self.address[0]}:{self.address[1]} says it is "
                              f"engine {info['engine_id']}; set engine_id={self.engine_id} in its spec",
                              self.engine_id, "connect")

    def call(self, op: str, timeout_s: float | None = None, /, **args):
        """Send one request and wait for its reply (≤ ``timeout_s``). Blocking; see :meth:`submit`."""
        timeout_s = self.control_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if self._broken:
                raise EngineError(f"{self.describe()}: {op}: connection unusable ({self._broken})", self.engine_id, op)
            if self._conn is None:
                raise EngineError(f"{self.describe()}: {op}: not connected", self.engine_id, op)
            try:
                self._conn.send(Request(op=op, args=args, protocol=PROTOCOL_VERSION))
                if not self._conn.poll(timeout_s):
                    # A late reply would be read as the answer to the next request: never reuse this connection.
                    self._broken = f"no reply to {op!r} within {timeout_s:.0f}s"
                    raise EngineError(f"{self.describe()}: {op}: no reply within {timeout_s:.0f}s "
                                      f"(alive={self.alive()}){self._death_note()}", self.engine_id, op)
                reply = self._conn.recv()
            except EngineError:
                raise
            except (EOFError, OSError) as e:
                self._broken = f"connection lost during {op!r}"
                time.sleep(0.2)  # let a dying process be reaped so the death note can report its exit code
                raise EngineError(f"{self.describe()}: {op}: connection lost ({type(e).__name__})"
                                  f"{self._death_note()}", self.engine_id, op) from e
        if not isinstance(reply, Reply):
            raise EngineError(f"{self.describe()}: {op}: malformed reply {type(reply).__name__}", self.engine_id, op)
        if reply.protocol != PROTOCOL_VERSION:
            raise EngineError(f"{self.describe()}: protocol {reply.protocol}, trainer speaks {PROTOCOL_VERSION}",
                              self.engine_id, op)
        if not reply.ok:
            raise EngineError(f"{self.describe()}: {op} failed: {reply.error}", self.engine_id, op)
        return reply.value

    def submit(self, op: str, timeout_s: float | None = None, /, **args) -> Future:
        """Queue a request behind this engine's earlier ones; returns a Future of its reply value."""
        fut = self._executor.submit(self.call, op, timeout_s, **args)
        self._outstanding.add(fut)
        fut.add_done_callback(self._outstanding.discard)
        return fut

    # ---- generation

    def submit_generate(self, requests: Sequence[GenerationRequest], sampling: SamplingSpec) -> Future:
        """Non-blocking generate; the Future resolves to ``list[Sample]`` (prompt order, ``n`` per prompt)."""
        self._outstanding_prompts += len(requests)

        def run():
            t0 = time.perf_counter()
            try:
                return self.call("generate", self.request_timeout_s, requests=list(requests), sampling=sampling)
            finally:
                self._busy_s += time.perf_counter() - t0
                self._outstanding_prompts -= len(requests)

        fut = self._executor.submit(run)
        self._outstanding.add(fut)
        fut.add_done_callback(self._outstanding.discard)
        return fut

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingSpec) -> list[Sample]:
        return self.submit_generate(requests, sampling).result()

    @property
    def outstanding_prompts(self) -> int:
        return self._outstanding_prompts

    def drain(self, timeout_s: float) -> None:
        """Wait until every queued request of this engine has finished (errors are the submitters' to see)."""
        deadline = time.monotonic() + timeout_s
        for fut in list(self._outstanding):
            left = deadline - time.monotonic()
            try:
                fut.result(timeout=max(0.0, left))
            except TimeoutError:
                raise EngineError(f"{self.describe()}: in-flight requests did not finish within {timeout_s:.0f}s",
                                  self.engine_id, "drain") from None
            except Exception:
                pass

    def version(self) -> int:
        return self.call("version")

    def utilization(self) -> dict:
        """Busy = a generate request in flight on this engine (client-side wall time)."""
        wall = time.perf_counter() - self._t_start
        return {"busy_s": self._busy_s, "wall_s": wall, "idle_fraction": max(0.0, 1.0 - self._busy_s / wall)}

    # ---- weight sync (the trainer normally goes through EngineGroup.sync_weights)

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                          timeout_s: float) -> Future:
        """Every worker of this engine joins the weight group at ``rank_offset + tp_rank`` (resolves to the ranks).
        Blocks on the engine until rank 0 and all other members join (≤ ``timeout_s``)."""
        return self.submit("init_weight_group", timeout_s + 30, host=host, port=port, rank_offset=rank_offset,
                           world_size=world_size, backend=backend, timeout_s=timeout_s)

    def receive_weights(self, meta: SyncMeta, timeout_s: float) -> Future:
        """Start receiving the buckets ``meta`` describes; resolves after they are received and verified."""
        return self.begin_receive(meta, timeout_s)

    def shutdown(self) -> None:
        self.close()

    # ---- SyncTarget

    def begin_receive(self, meta: SyncMeta, timeout_s: float) -> Future:
        return self.submit("receive_weights", timeout_s, meta=asdict(meta))

    def commit(self, version: int, timeout_s: float) -> Future:
        return self.submit("commit_weights", timeout_s, version=version)

    def abort(self, timeout_s: float) -> Future:
        return self.submit("abort_weights", timeout_s)

    # ---- teardown

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the server to exit, then make sure the process (group) is gone. Idempotent."""
        if self._conn is not None and not self._broken and self.alive():
            try:
                # Not through the executor: it may be stuck behind a long generate we are abandoning.
                if self._lock.acquire(timeout=1.0):
                    try:
                        self._conn.send(Request(op="shutdown"))
                        self._conn.poll(min(timeout_s, 5.0))
                    finally:
                        self._lock.release()
            except (OSError, EOFError):
                pass
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._broken = self._broken or "closed"
        if self.proc is not None:
            _stop_process(self.proc, timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _stop_process(proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait for a polite exit, then SIGTERM, then SIGKILL of the process and its process group."""
    for sig, wait in ((None, timeout_s / 2), (signal.SIGTERM, timeout_s / 2), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        if sig is not None:
            try:
                os.killpg(proc.pid, sig)  # the server leads its own session: this reaches vLLM's children too
            except ProcessLookupError:
                break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    try:  # children that outlived the leader (multiprocess vLLM) share its process group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# Live groups, shut down at interpreter exit and on SIGTERM (SIGINT raises KeyboardInterrupt → atexit).
_LIVE_GROUPS: "weakref.WeakSet[EngineGroup]" = weakref.WeakSet()
_HANDLERS_INSTALLED = False


def _shutdown_all() -> None:
    for g in list(_LIVE_GROUPS):
        g.shutdown()


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_shutdown_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit + PDEATHSIG still hold
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        _shutdown_all()
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


class EngineGroup:
    """N engines: start, balanced generation (blocking or non-blocking), weight sync, shutdown."""

    def __init__(self, model: str, rollout: RolloutConfig, weight_sync: WeightSyncConfig | None = None,
                 log_dir: str | Path | None = None, authkey: bytes | None = None, env: dict | None = None):
        self.model = str(model)
        self.cfg = rollout
        self.sync_cfg = weight_sync or WeightSyncConfig()
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="oapl_engines_"))
        self.authkey = authkey or secrets.token_bytes(32)
        self.env = env or {}
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
        _install_handlers()
        _LIVE_GROUPS.add(self)
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
        env = dict(os.environ)
        env.update(self.env)
        env[AUTHKEY_ENV] = self.authkey.hex()
        repo_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = repo_root + os.pathsep + env.get("PYTHONPATH", "")
        pending = []
        for i in range(self.cfg.engines):
            spec = EngineSpec(model=self.model, engine_id=i, tp=self.cfg.engine_tp, dtype=self.cfg.dtype,
                              max_model_len=self.cfg.max_model_len, kv_cache_bytes=self.cfg.kv_cache_bytes,
                              enforce_eager=self.cfg.enforce_eager,
                              gpu_memory_utilization=self.cfg.gpu_memory_utilization, seed=self.cfg.seed)
            spec_path = self.log_dir / f"engine{i}.spec.json"
            spec_path.write_text(json.dumps(asdict(spec)))
            ready = self.log_dir / f"engine{i}.ready.json"
            ready.unlink(missing_ok=True)
            log = self.log_dir / f"engine{i}.log"
            # Spawned from this thread on purpose: PR_SET_PDEATHSIG fires when the *spawning thread* exits.
            with open(log, "wb") as logf:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "oapl_megatron.rollout.engine_server", "--spec", str(spec_path),
                     "--ready-file", str(ready), "--parent-pid", str(os.getpid())],
                    stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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

    def _attach_cluster(self) -> None:
        for i, addr in enumerate(self.cfg.addresses):
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
        _LIVE_GROUPS.discard(self)

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
