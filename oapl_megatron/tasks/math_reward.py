"""Math reward: pull the final answer out of a response, then check it against the reference with math-verify.

Extraction tries the strategies of :class:`~oapl_megatron.config.data.MathRewardConfig` in order (first hit wins):

- ``boxed``: the content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``), nested and escaped braces handled;
- ``hash``: the text after the last ``####`` (GSM8K style), up to the end of that line;
- ``last_number``: the last number in the text (``-3``, ``1,000``, ``0.25``, ``3/4``).

When ``answer_after`` (default ``</think>``) occurs, only the text after its last occurrence is searched, so
numbers in the reasoning of a thinking model are never taken as its answer.

Verification parses both sides as ``\\boxed{answer}`` with ``math_verify.parse`` and compares them with
``math_verify.verify`` (gold first: the comparison is asymmetric), so fractions, decimals, radicals, intervals,
sets, percentages and LaTeX spellings (``\\dfrac``, ``\\tfrac``, ``\\frac12``) compare symbolically. Every check
runs under a wall-clock limit: in the main thread a ``SIGALRM`` timer (fractional seconds, raising an exception
math-verify cannot swallow); in other threads, or with ``timeout_mode="process"``, a persistent worker process
that is killed and restarted when a check overruns. A timed-out check gets ``wrong_reward`` and reason
``timeout``.

Usage::

    from oapl_megatron.tasks.math_reward import math_reward
    math_reward("... so the answer is \\boxed{\\frac{1}{2}}", "0.5")
    # {'reward': 1.0, 'extracted': '\\frac{1}{2}', 'reason': 'correct', 'strategy': 'boxed'}

The worker process is this module run as ``python -m oapl_megatron.tasks.math_reward --serve`` (JSON lines on
stdin/stdout).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from oapl_megatron.config.data import MathRewardConfig

logger = logging.getLogger(__name__)

#: How long the verify worker process may take to import math-verify and say it is ready.
WORKER_STARTUP_TIMEOUT_S = 120.0

# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
# A number: thousands-separated or plain integer/decimal, optionally a simple fraction a/b.
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``; None when absent or unclosed.

    Braces nest; ``\\{`` and ``\\}`` are escaped braces (set notation) and do not count. ``\\boxed 5`` (no braces)
    yields the next whitespace-delimited token.
    """
    for m in reversed(list(_BOXED_RE.finditer(text))):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                ch = text[j]
                if ch == "\\":
                    j += 2  # skip the escaped character (\{, \}, \\)
                    continue
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
            continue  # unclosed (truncated response): try an earlier one
        if i > m.end():  # "\boxed 5": a space then a bare token
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0)
    return None


def hash_answer(text: str) -> str | None:
    """Text after the last ``####`` up to the end of its line, without ``$`` and a trailing period."""
    matches = _HASH_RE.findall(text)
    if not matches:
        return None
    ans = matches[-1].strip().replace("$", "").rstrip(".").strip()
    return ans or None


def last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed, or None."""
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "")


_EXTRACTORS = {"boxed": last_boxed, "hash": hash_answer, "last_number": last_number}


def extract_answer(response: str, cfg: MathRewardConfig | None = None) -> tuple[str | None, str | None]:
    """The final answer of ``response`` and the strategy that found it: ``(answer, strategy)`` or ``(None, None)``."""
    cfg = cfg or MathRewardConfig()
    text = response
    if cfg.answer_after and cfg.answer_after in text:
        text = text.rsplit(cfg.answer_after, 1)[1]
    for name in cfg.strategies:
        ans = _EXTRACTORS[name](text)
        if ans:
            return ans, name
    return None, None


def reference_answer(answer: str) -> str:
    """The reference answer to compare against: the last ``\\boxed{}`` of a worked solution, else the text itself."""
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer.strip()


# ---------------------------------------------------------------------------------------------------------------
# Verification (math-verify) under a wall-clock limit
# ---------------------------------------------------------------------------------------------------------------


class _MathVerifyNoise(logging.Filter):
    # We run math-verify with its own signal timeouts off and enforce our own limit; its one-time warning that
    # "timeout is disabled" would mislead a reader of the logs.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_MV_LOADED = False


def _load_math_verify() -> tuple[Any, Any]:
    global _MV_LOADED
    from math_verify import parse, verify

    if not _MV_LOADED:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_MathVerifyNoise())
        # Warm-up outside any time limit: the first parse loads the LaTeX grammar and sympy submodules, a
        # one-off cost that must not be charged to (and time out) the first real check.
        verify(parse("\\boxed{\\frac{1}{2}}", parsing_timeout=None), parse("\\boxed{0.5}", parsing_timeout=None),
               timeout_seconds=None)
        _MV_LOADED = True
    return parse, verify


def _parse_and_verify(gold: str, pred: str, float_rounding: int) -> tuple[bool, str]:
    """Untimed check; returns ``(is_equivalent, reason)``. Run it only under a limit (see :func:`verify_answer`)."""
    parse, verify = _load_math_verify()
    # Wrapping in \boxed{} makes math-verify read the whole string as one LaTeX answer (a bare "2\sqrt{2}" would
    # otherwise be read as the number 2).
    g = parse("\\boxed{" + gold + "}", parsing_timeout=None) or parse(gold, parsing_timeout=None)
    if not g:
        return False, "unparsable_reference"
    t = parse("\\boxed{" + pred + "}", parsing_timeout=None) or parse(pred, parsing_timeout=None)
    if not t:
        return False, "unparsable_answer"
    ok = verify(g, t, float_rounding=float_rounding, timeout_seconds=None)
    return bool(ok), ("correct" if ok else "wrong")


class _Deadline(BaseException):
    """Raised by the SIGALRM handler. A BaseException so math-verify's ``except Exception`` cannot swallow it."""


def _verify_with_alarm(gold: str, pred: str, float_rounding: int, timeout_s: float) -> tuple[bool, str]:
    _load_math_verify()  # one-off imports and warm-up happen before the timer starts

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Deadline()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            return _parse_and_verify(gold, pred, float_rounding)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:  # outside the inner finally: also catches an alarm that fires while disarming
        return False, "timeout"
    except Exception as e:  # a crash inside sympy is a failed check, not a failed run
        logger.debug("math-verify raised", exc_info=True)
        return False, f"error: {type(e).__name__}"
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # give back a timer someone else had armed, minus the time we used
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3), old_interval)


class _VerifyWorker:
    """One persistent ``python -m oapl_megatron.tasks.math_reward --serve`` child; killed when a check overruns.

    Contract: requests are serialized by a lock (one check at a time per worker); each answer is one JSON line.
    A check that does not answer within ``timeout_s`` kills the child (SIGKILL) and the next check starts a new one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""

    def _start(self) -> None:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "oapl_megatron.tasks.math_reward", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buf = b""
        ready = self._read_line(WORKER_STARTUP_TIMEOUT_S)
        if ready is None or not json.loads(ready).get("ready"):
            pid = self._proc.pid
            self._kill()
            raise RuntimeError(
                f"math-verify worker process (pid {pid}) did not report ready within {WORKER_STARTUP_TIMEOUT_S} s"
            )

    def _read_line(self, timeout_s: float) -> str | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker died
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def check(self, gold: str, pred: str, float_rounding: int, timeout_s: float) -> tuple[bool, str]:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            msg = json.dumps({"gold": gold, "pred": pred, "float_rounding": float_rounding}) + "\n"
            self._proc.stdin.write(msg.encode())
            self._proc.stdin.flush()
            line = self._read_line(timeout_s)
            if line is None:
                self._kill()
                return False, "timeout"
            out = json.loads(line)
            return bool(out["ok"]), str(out["reason"])

    def close(self) -> None:
        with self._lock:
            self._kill()


_WORKER = _VerifyWorker()
atexit.register(_WORKER.close)


def verify_answer(gold: str, pred: str, cfg: MathRewardConfig | None = None) -> tuple[bool, str]:
    """Is ``pred`` equivalent to ``gold``? Returns ``(ok, reason)``; reason is one of ``correct``, ``wrong``,
    ``unparsable_reference``, ``unparsable_answer``, ``timeout``, ``error: <exception type>`` (sympy crashed).
    Bounded by ``cfg.timeout_s`` seconds of wall-clock time."""
    cfg = cfg or MathRewardConfig()
    in_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if cfg.timeout_mode == "auto" and in_main:
        return _verify_with_alarm(gold, pred, cfg.float_rounding, cfg.timeout_s)
    return _WORKER.check(gold, pred, cfg.float_rounding, cfg.timeout_s)


def math_reward(response: str, answer: str, cfg: MathRewardConfig | None = None) -> dict[str, Any]:
    """Score one response against a reference answer.

    Returns ``{"reward": float, "extracted": str | None, "reason": str, "strategy": str | None}``; reason is
    ``no_answer`` when nothing could be extracted, else a reason of :func:`verify_answer`.
    """
    cfg = cfg or MathRewardConfig()
    extracted, strategy = extract_answer(response, cfg)
    if extracted is None:
        return {"reward": cfg.wrong_reward, "extracted": None, "reason": "no_answer", "strategy": None}
    ok, reason = verify_answer(reference_answer(answer), extracted, cfg)
    return {
        "reward": cfg.correct_reward if ok else cfg.wrong_reward,
        "extracted": extracted,
        "reason": reason,
        "strategy": strategy,
    }


def _serve() -> None:
    """Worker loop: one JSON request per stdin line -> one JSON answer per stdout line."""
    _load_math_verify()
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            ok, reason = _parse_and_verify(req["gold"], req["pred"], int(req["float_rounding"]))
        except Exception as e:  # a crash in sympy is a failed check, not a dead worker
            ok, reason = False, f"error: {type(e).__name__}"
        out.write(json.dumps({"ok": ok, "reason": reason}) + "\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        sys.exit("usage: python -m oapl_megatron.tasks.math_reward --serve  (the verify worker; see oapl-reward)")
