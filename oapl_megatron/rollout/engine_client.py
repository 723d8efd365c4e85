"""The trainer's control-plane client of one engine server (:mod:`oapl_megatron.rollout.engine_server`).

Requests to one engine run one at a time, in order, on one authenticated connection (a single-thread executor), so a
generate and a weight update never interleave on an engine. Every request has a timeout, and every error names the
engine (id, pid or address) and the op; when the engine process died, the error carries its exit code and the tail
of its log. An :class:`EngineClient` is also the :class:`~oapl_megatron.weight_sync.sync.SyncTarget` of its engine.

    client = EngineClient(0, ("127.0.0.1", port), authkey, tp=1)
    client.connect(timeout_s=60)
    samples = client.generate([GenerationRequest("p0", ids)], SamplingSpec(n=4, max_tokens=64))
"""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from multiprocessing.connection import Client
from pathlib import Path
from typing import Sequence

from oapl_megatron.rollout.engine_process import stop_process
from oapl_megatron.rollout.types import PROTOCOL_VERSION, GenerationRequest, Reply, Request, Sample, SamplingSpec
from oapl_megatron.weight_sync.sync import SyncMeta


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
            stop_process(self.proc, timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)
