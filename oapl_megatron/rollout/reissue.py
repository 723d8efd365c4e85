"""In-flight accounting of one generation call over several engines, so a dead engine's work is re-issued exactly once.

:meth:`EngineGroup.submit <oapl_megatron.rollout.engine_group.EngineGroup.submit>` spreads a call's requests (one
request = one prompt = one group of ``n`` samples) over the live engines. Each piece sent to one engine is an
*attempt*. When that engine dies, its unfinished attempts are *abandoned* and their requests re-issued to the
engines still alive. The ledger guarantees the three properties the trainer's data accounting relies on:

* none lost: the call completes only when every request has the samples of exactly one attempt;
* none counted twice: a reply that arrives for an abandoned attempt (a wedged engine answering late, after its
  requests went elsewhere) is ignored, and an abandoned attempt is re-issued once however many times its failure
  is reported (by the liveness monitor and by the failed request itself);
* each request keeps the samples, and therefore the policy version, of the one engine that generated all of them
  (an attempt's samples are accepted whole or not at all).

Pure bookkeeping (no threads started, no I/O); thread-safe. Used as::

    ledger = Ledger(len(requests), n=sampling.n)
    a = ledger.assign((0, 0), [0, 1, 2])              # → attempt id
    ledger.complete(a, samples)                        # True if accepted
    again = ledger.abandon(a)                          # request indexes to re-issue ([] if already settled)
    again = ledger.abandon_engine(engine)              # every unfinished attempt of a dead engine
    ledger.done(); ledger.results()                    # samples in request order
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Hashable


@dataclass
class _Attempt:
    engine: Hashable  # one incarnation of one engine, e.g. (engine_id, restart count)
    indexes: list[int]
    state: str = "running"  # running | done | abandoned


class Ledger:
    def __init__(self, n_requests: int, n: int):
        if n_requests < 0 or n < 1:
            raise ValueError(f"Ledger: n_requests={n_requests} must be >= 0 and n={n} >= 1")
        self.n = n
        self._samples: list[list | None] = [None] * n_requests
        self._owner: list[int | None] = [None] * n_requests  # running attempt of each request
        self._attempts: list[_Attempt] = []
        self._lock = threading.Lock()
        self.reissued = 0  # requests (groups) sent again after their engine died
        self.late_replies = 0  # replies of abandoned attempts, ignored

    def assign(self, engine: Hashable, indexes: list[int]) -> int:
        """Record that ``indexes`` go to ``engine``; each must be pending and not held by a running attempt."""
        with self._lock:
            for i in indexes:
                if self._samples[i] is not None or self._owner[i] is not None:
                    raise RuntimeError(f"request {i} assigned twice (done={self._samples[i] is not None}, "
                                       f"held by attempt {self._owner[i]})")
            attempt = len(self._attempts)
            self._attempts.append(_Attempt(engine, list(indexes)))
            for i in indexes:
                self._owner[i] = attempt
            return attempt

    def complete(self, attempt: int, samples: list) -> bool:
        """Accept the attempt's samples (``n`` per request, in its request order); False if it was abandoned."""
        with self._lock:
            a = self._attempts[attempt]
            if a.state != "running":
                self.late_replies += int(a.state == "abandoned")
                return False
            if len(samples) != len(a.indexes) * self.n:
                raise RuntimeError(f"engine {a.engine} returned {len(samples)} samples for {len(a.indexes)} "
                                   f"requests × n={self.n}")
            for j, i in enumerate(a.indexes):
                self._samples[i] = samples[j * self.n:(j + 1) * self.n]
                self._owner[i] = None
            a.state = "done"
            return True

    def abandon(self, attempt: int) -> list[int]:
        """Give up on a running attempt; returns its request indexes to re-issue ([] if it is already settled)."""
        with self._lock:
            return self._abandon(attempt)

    def abandon_engine(self, engine: Hashable) -> list[int]:
        """Abandon every running attempt on ``engine``; returns the request indexes to re-issue."""
        with self._lock:
            out = []
            for k, a in enumerate(self._attempts):
                if a.engine == engine and a.state == "running":
                    out += self._abandon(k)
            return out

    def _abandon(self, attempt: int) -> list[int]:
        a = self._attempts[attempt]
        if a.state != "running":
            return []
        a.state = "abandoned"
        for i in a.indexes:
            self._owner[i] = None
        self.reissued += len(a.indexes)
        return list(a.indexes)

    def running_engines(self) -> set:
        with self._lock:
            return {a.engine for a in self._attempts if a.state == "running"}

    def done(self) -> bool:
        with self._lock:
            return all(s is not None for s in self._samples)

    def results(self) -> list:
        """Samples in request order (``n`` consecutive per request); raises if any request is unfinished."""
        with self._lock:
            missing = [i for i, s in enumerate(self._samples) if s is None]
            if missing:
                raise RuntimeError(f"requests {missing[:10]} have no samples yet")
            return [x for s in self._samples for x in s]
