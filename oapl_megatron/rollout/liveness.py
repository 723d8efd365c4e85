"""Engine liveness: a UDP heartbeat answered by every engine server, watched by the trainer with a timeout.

A failed request only shows a dead engine when something is sent to it, and a stopped or wedged engine (SIGSTOP,
a machine that froze) never fails a request: the trainer's call just waits for ``request_timeout_s`` (an hour by
default). So every engine server also answers heartbeats, on their own thread and socket, and the trainer's
:class:`LivenessMonitor` declares an engine dead when

* its process exited (local mode: ``proc.poll()``), at once, or
* no heartbeat reply arrived for ``timeout_s`` seconds (a beat goes out every ``interval_s``).

Why UDP: a beat is one datagram each way with no connection state, so a stopped peer can never block the monitor
(a ``multiprocessing.connection`` handshake to a stopped process blocks without a timeout). A reply is an HMAC of the
beat's nonce under the engine authkey, so only the engine server that holds the key can keep itself alive.

Server side (inside the engine server, started once its control listener is bound)::

    hb = HeartbeatResponder(host, authkey, engine_id)      # daemon thread; hb.port goes into the ping reply

Trainer side::

    mon = LivenessMonitor(on_dead=group.engine_failed, interval_s=1.0, timeout_s=10.0).start()
    mon.watch(engine_id, (host, hb_port), authkey, proc)    # after the engine answered its first ping
    mon.unwatch(engine_id)                                  # when the group stops or replaces it
    mon.stop()

:class:`LivenessTracker` is the pure bookkeeping (no sockets, no threads, a clock passed in), unit-tested alone.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

_BEAT = struct.Struct("!IQ")  # engine id, nonce
_DIGEST = 16


def _mac(authkey: bytes, payload: bytes) -> bytes:
    return hmac.new(authkey, payload, hashlib.sha256).digest()[:_DIGEST]


class HeartbeatResponder:
    """Engine side: answer every authentic beat addressed to ``engine_id`` on a UDP port (daemon thread)."""

    def __init__(self, host: str, authkey: bytes, engine_id: int):
        self._key = authkey
        self._engine_id = engine_id
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="heartbeat", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self._sock.recvfrom(256)
            except OSError:
                return  # socket closed: the server is exiting
            if len(data) != _BEAT.size + _DIGEST:
                continue
            beat, mac = data[:_BEAT.size], data[_BEAT.size:]
            if not hmac.compare_digest(mac, _mac(self._key, beat)) or _BEAT.unpack(beat)[0] != self._engine_id:
                continue  # not from our trainer, or meant for another engine that used this port before
            try:
                self._sock.sendto(beat + _mac(self._key, b"ack" + beat), peer)
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()


@dataclass
class _Watched:
    address: tuple[str, int]
    authkey: bytes
    proc: subprocess.Popen | None
    since: float  # when watching started (counts as the first reply: a fresh engine gets a full timeout)
    last_reply: float = field(init=False)

    def __post_init__(self):
        self.last_reply = self.since


class LivenessTracker:
    """Pure bookkeeping: when each watched engine last answered, and which ones are overdue at time ``now``.

    An engine is overdue once ``now - last_reply > timeout_s``; an engine whose process exited is dead at once.
    Each engine is reported dead once (then it is no longer watched)."""

    def __init__(self, timeout_s: float):
        if timeout_s <= 0:
            raise ValueError(f"liveness timeout must be > 0 (got {timeout_s})")
        self.timeout_s = timeout_s
        self.watched: dict[int, _Watched] = {}

    def watch(self, engine_id: int, address: tuple[str, int], authkey: bytes, proc, now: float) -> None:
        self.watched[engine_id] = _Watched(address, authkey, proc, now)

    def unwatch(self, engine_id: int) -> None:
        self.watched.pop(engine_id, None)

    def reply(self, engine_id: int, now: float) -> None:
        w = self.watched.get(engine_id)
        if w is not None:
            w.last_reply = max(w.last_reply, now)

    def overdue(self, now: float) -> list[tuple[int, str]]:
        """``(engine_id, reason)`` of every engine to declare dead now; they are unwatched."""
        dead = []
        for i, w in list(self.watched.items()):
            if w.proc is not None and w.proc.poll() is not None:
                dead.append((i, f"process exited with code {w.proc.returncode}"))
            elif now - w.last_reply > self.timeout_s:
                dead.append((i, f"no heartbeat for {now - w.last_reply:.1f}s (timeout {self.timeout_s:.1f}s)"))
        for i, _ in dead:
            self.unwatch(i)
        return dead


class LivenessMonitor:
    """Trainer side: beat every watched engine every ``interval_s``; call ``on_dead(engine_id, reason)`` (from the
    monitor thread, once per watch) when one exits or stays silent for ``timeout_s``."""

    def __init__(self, on_dead: Callable[[int, str], None], interval_s: float, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < interval_s < timeout_s:
            raise ValueError(f"heartbeat interval ({interval_s}s) must be > 0 and below the liveness timeout "
                             f"({timeout_s}s), or one late beat declares a healthy engine dead")
        self.interval_s = interval_s
        self._on_dead = on_dead
        self._clock = clock
        self._tracker = LivenessTracker(timeout_s)
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("0.0.0.0", 0))
        self._nonce = int.from_bytes(os.urandom(4), "big")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self) -> "LivenessMonitor":
        self._thread.start()
        return self

    def watch(self, engine_id: int, address: tuple[str, int], authkey: bytes,
              proc: subprocess.Popen | None = None) -> None:
        with self._lock:
            self._tracker.watch(engine_id, address, authkey, proc, self._clock())

    def unwatch(self, engine_id: int) -> None:
        with self._lock:
            self._tracker.unwatch(engine_id)

    def watching(self) -> set[int]:
        with self._lock:
            return set(self._tracker.watched)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._sock.close()

    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            now = self._clock()
            if now >= next_beat:
                self._beat_all()
                next_beat = now + self.interval_s
            self._receive(max(0.0, min(next_beat - self._clock(), self.interval_s)))
            with self._lock:
                dead = self._tracker.overdue(self._clock())
            for engine_id, reason in dead:
                try:
                    self._on_dead(engine_id, reason)
                except Exception as e:  # the monitor must keep watching the others
                    print(f"warning: liveness: handling the death of engine {engine_id} failed: {e}",
                          file=sys.stderr, flush=True)

    def _beat_all(self) -> None:
        with self._lock:
            targets = [(i, w.address, w.authkey) for i, w in self._tracker.watched.items()]
        for i, addr, key in targets:
            self._nonce = (self._nonce + 1) % (1 << 64)
            beat = _BEAT.pack(i, self._nonce)
            try:
                self._sock.sendto(beat + _mac(key, beat), addr)
            except OSError:
                pass  # unreachable now: the timeout decides

    def _receive(self, wait_s: float) -> None:
        deadline = self._clock() + wait_s
        while True:
            left = deadline - self._clock()
            try:
                ready, _, _ = select.select([self._sock], [], [], max(0.0, left))
            except (OSError, ValueError):
                return  # closed by stop()
            if not ready:
                return
            try:
                data, _ = self._sock.recvfrom(256)
            except OSError:
                return
            if len(data) != _BEAT.size + _DIGEST:
                continue
            beat, mac = data[:_BEAT.size], data[_BEAT.size:]
            engine_id = _BEAT.unpack(beat)[0]
            with self._lock:
                w = self._tracker.watched.get(engine_id)
                if w is not None and hmac.compare_digest(mac, _mac(w.authkey, b"ack" + beat)):
                    self._tracker.reply(engine_id, self._clock())
