"""A pool of scoring workers that takes rewards off the critical path: groups of responses go in, scored groups come
out, in the order they went in.

Executing tests is the slow part of code RL. The rollout producer hands each finished group (G responses of one
prompt) to the pool and goes back to generating; ``workers`` threads score the responses (for code each runs the
program in its own sandboxed child process, so the threads wait on children, not on the GIL); one delivery thread
hands every group to ``deliver`` once all of its responses are scored, strictly in submission order. So only
scored groups reach the rollout buffer, the buffer sees the same order as with inline scoring (runs stay
reproducible), and no group is delivered twice or skipped: a group whose scoring fails stops the pool and the error
is re-raised by :meth:`RewardPool.check` (the producer surfaces it to the trainer).

    pool = RewardPool(task.reward, workers=4, deliver=lambda payload, results: buffer.put(...)).start()
    pool.submit(prompt, [text_1, ..., text_G], payload)     # returns at once
    pool.wait_for_room(max_pending=64, timeout=1.0)         # backpressure for the producer
    pool.stats()   # groups/responses scored, sandbox programs run, programs per second, reasons
    pool.close()

Accounting: ``submitted == delivered + pending`` while open (``+ dropped_at_close`` after :meth:`close`); each
response is scored exactly once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from oapl_megatron.tasks.base import Prompt, RewardResult

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Prompt, str], RewardResult]
DeliverFn = Callable[[Any, list[RewardResult]], None]


class RewardPoolError(RuntimeError):
    """Scoring a group failed (the scorer raised, or a group took longer than the pool's timeout)."""


@dataclass
class _Pending:
    ticket: int
    prompt: Prompt
    payload: Any
    futures: list[Future]
    submitted_at: float = field(default_factory=time.monotonic)


def _timed(score: ScoreFn, prompt: Prompt, text: str) -> tuple[RewardResult, float]:
    t0 = time.perf_counter()
    res = score(prompt, text)
    return res, time.perf_counter() - t0


class RewardPool:
    """``workers`` scoring threads and one in-order delivery thread (see the module docstring).

    ``deliver(payload, results)`` runs on the delivery thread, once per group, in submission order; ``results``
    holds one :class:`RewardResult` per response, in the order the responses were submitted.
    """

    def __init__(self, score: ScoreFn, workers: int, deliver: DeliverFn, timeout_s: float = 3600.0,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        """``timeout_s`` bounds one group's scoring from its submission; ``on_error(exc)`` is called once, on the
        delivery thread, when the pool fails (e.g. to wake a consumer that waits for groups)."""
        if workers < 1:
            raise ValueError(f"RewardPool: workers must be >= 1, got {workers}")
        self.score, self.workers, self.deliver, self.timeout_s = score, workers, deliver, timeout_s
        self.on_error = on_error
        self._exec = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._next_ticket = 0
        self._thread = threading.Thread(target=self._deliver_loop, name="reward-delivery", daemon=True)
        # accounting (under _cv)
        self.submitted = 0
        self.delivered = 0
        self.responses_scored = 0
        self.score_seconds = 0.0  # sum over responses of the scorer's wall time (≈ workers × busy time)
        self.sandbox_runs = 0  # programs run, from RewardResult.info["sandbox_runs"] when the task reports it
        self.reasons: collections.Counter = collections.Counter()
        self.delivered_tickets: list[int] = []  # kept short: the last 10,000, for ordering checks
        self.dropped_at_close = 0  # groups still pending when close() was called (not delivered, on purpose)
        self.busy_s = 0.0  # wall time with at least one group pending (the pool's throughput denominator)
        self._busy_since: float | None = None

    def start(self) -> "RewardPool":
        self._thread.start()
        return self

    # -- producer side ---------------------------------------------------------------------------------------------

    def submit(self, prompt: Prompt, responses: Sequence[str], payload: Any) -> int:
        """Queue one group for scoring; returns its ticket (0, 1, 2, ... in submission order)."""
        self.check()
        with self._cv:
            if self._closed:
                raise RewardPoolError("RewardPool.submit after close()")
            ticket = self._next_ticket
            self._next_ticket += 1
            futures = [self._exec.submit(_timed, self.score, prompt, text) for text in responses]
            self._queue.append(_Pending(ticket, prompt, payload, futures))
            if self.submitted == self.delivered:
                self._busy_since = time.monotonic()
            self.submitted += 1
            self._cv.notify_all()
        return ticket

    def pending(self) -> int:
        """Groups submitted and not yet delivered."""
        with self._cv:
            return self.submitted - self.delivered

    def wait_for_room(self, max_pending: int, timeout: float) -> bool:
        """Block until fewer than ``max_pending`` groups are pending (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.submitted - self.delivered >= max_pending and not self._closed and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        self.check()
        return True

    def drain(self, timeout: float) -> None:
        """Block until every submitted group is delivered; raises :class:`RewardPoolError` on timeout or failure."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.submitted > self.delivered and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RewardPoolError(f"reward pool: {self.submitted - self.delivered} groups still pending "
                                          f"after {timeout:.0f} s")
                self._cv.wait(left)
        self.check()

    def check(self) -> None:
        """Re-raise a scoring failure (as :class:`RewardPoolError`, naming the group)."""
        if self._error is not None:
            raise RewardPoolError(f"reward pool failed: {self._error}") from self._error

    def close(self, timeout: float = 30.0) -> None:
        """Stop: groups not yet delivered are dropped (the run is ending), running programs finish or time out."""
        with self._cv:
            self._closed = True
            for p in self._queue:
                for f in p.futures:
                    f.cancel()
            self._cv.notify_all()
        self._thread.join(timeout)  # a group being delivered right now still finishes (and counts as delivered)
        self._exec.shutdown(wait=True, cancel_futures=True)
        with self._cv:
            self.dropped_at_close = len(self._queue)

    # -- delivery --------------------------------------------------------------------------------------------------

    def _deliver_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                head = self._queue[0]
            try:
                done = [f.result(timeout=max(0.0, head.submitted_at + self.timeout_s - time.monotonic()))
                        for f in head.futures]
            except BaseException as exc:  # the scorer raised, or the group took too long
                if isinstance(exc, TimeoutError):
                    what = f"timed out (timeout_s={self.timeout_s})"
                else:
                    what = f"{type(exc).__name__}: {exc}"
                self._fail(f"scoring group {head.ticket} (prompt {head.prompt.id}) {what}", exc)
                return
            results = [r for r, _ in done]
            try:
                self.deliver(head.payload, results)
            except BaseException as exc:
                self._fail(f"delivering group {head.ticket} (prompt {head.prompt.id}) failed: "
                           f"{type(exc).__name__}: {exc}", exc)
                return
            with self._cv:
                self._queue.popleft()
                self.delivered += 1
                self.delivered_tickets.append(head.ticket)
                del self.delivered_tickets[:-10_000]
                self.responses_scored += len(results)
                self.score_seconds += sum(s for _, s in done)
                for r in results:
                    self.reasons[str(r.info.get("reason", "scored"))] += 1
                    self.sandbox_runs += int(r.info.get("sandbox_runs", 0))
                if self.delivered == self.submitted and self._busy_since is not None:
                    self.busy_s += time.monotonic() - self._busy_since
                    self._busy_since = None
                self._cv.notify_all()

    def _fail(self, message: str, cause: BaseException) -> None:
        with self._cv:
            if self._closed:  # close() cancelled the futures: not a failure
                return
        error = RewardPoolError(message)
        error.__cause__ = cause
        logger.error("reward pool: %s", message)
        try:  # the consumer is told before any waiter (drain, wait_for_room, check) can see the failure
            if self.on_error is not None:
                self.on_error(error)
        finally:
            with self._cv:
                self._error = error
                self._cv.notify_all()

    # -- reporting -------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counts and rates: ``programs_per_s`` is sandbox programs run per second of busy time (some group
        pending), ``score_s_per_response`` the mean scorer wall time of one response."""
        with self._cv:
            busy = self.busy_s + (time.monotonic() - self._busy_since if self._busy_since is not None else 0.0)
            return {
                "workers": self.workers,
                "groups_submitted": self.submitted,
                "groups_delivered": self.delivered,
                "groups_pending": self.submitted - self.delivered - self.dropped_at_close,
                "groups_dropped_at_close": self.dropped_at_close,
                "responses_scored": self.responses_scored,
                "sandbox_runs": self.sandbox_runs,
                "score_s_per_response": self.score_seconds / self.responses_scored if self.responses_scored else 0.0,
                "busy_s": busy,
                "programs_per_s": self.sandbox_runs / busy if busy > 0 else 0.0,
                "reasons": dict(self.reasons),
            }
