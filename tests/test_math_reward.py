"""Math reward: answer extraction, symbolic verification through math-verify (a table of equivalent and
non-equivalent pairs), and the per-check time limit in both the main-thread (SIGALRM) and worker-process paths."""

import os
import threading
import time

import pytest

from oapl_megatron.config.data import MathRewardConfig
from oapl_megatron.tasks.math_reward import (
    _WORKER,
    extract_answer,
    hash_answer,
    last_boxed,
    last_number,
    math_reward,
    reference_answer,
    verify_answer,
)

# The table checks equivalence, not speed: a generous limit keeps it stable on a loaded machine.
LENIENT = MathRewardConfig(timeout_s=60)

# (reference, candidate, equivalent?)
PAIRS = [
    # fractions and decimals
    (r"\frac{1}{2}", "0.5", True),
    (r"\frac{1}{2}", "1/2", True),
    (r"\frac12", r"\dfrac{1}{2}", True),
    (r"\tfrac{3}{4}", "0.75", True),
    ("3/4", r"\frac{6}{8}", True),
    ("0.1", r"\frac{1}{10}", True),
    (r"\frac{1}{3}", "0.3333333", True),
    (r"\frac{1}{3}", "0.33", False),
    (r"\frac{2}{3}", r"\frac{3}{2}", False),
    ("0.25", "0.2500", True),
    ("0.25", "0.26", False),
    # radicals
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2", True),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
    (r"3\sqrt{3}", r"\sqrt{27}", True),
    (r"\sqrt{2}", r"\sqrt{3}", False),
    (r"2\sqrt{2}", "2", False),
    (r"\sqrt[3]{8}", "2", True),
    # intervals
    ("(1,2]", "(1, 2]", True),
    ("[0,1)", "(0,1)", False),
    (r"(-\infty, 3)", r"(-\infty,3)", True),
    (r"(-\infty, 3)", r"(-\infty, 3]", False),
    (r"[2, \infty)", r"[2,\infty)", True),
    # sets
    (r"\{1,2\}", r"\{2,1\}", True),
    (r"\{1,2\}", "1,2", True),
    (r"\{1,2\}", r"\{1,3\}", False),
    ("1, 2, 3", "3, 1, 2", True),
    # negative numbers
    ("-3", "-3.0", True),
    ("-3", "3", False),
    ("-7", "-7", True),
    (r"-\frac{1}{2}", "-0.5", True),
    (r"-\frac{1}{2}", "0.5", False),
    # integers, powers, formatting
    ("1,000", "1000", True),
    ("12", "012", True),
    ("2^{10}", "1024", True),
    ("100", "1000", False),
    ("42", "41.9999", False),
    # units and text are ignored
    ("10", r"10\text{ cm}", True),
    ("5", r"5^\circ", True),
    (r"50\%", "50", True),
    (r"\$5", "5", True),
    ("x=5", "5", True),
    # symbolic expressions and constants
    ("a+b", "b+a", True),
    (r"\pi", "3.14159", False),
    (r"2\pi", r"\pi \cdot 2", True),
    (r"x^2+2x+1", r"(x+1)^2", True),
    (r"x^2+1", r"(x+1)^2", False),
    (r"\infty", r"\infty", True),
    (r"\infty", r"-\infty", False),
    ("x=5", "x=6", False),
    (r"\frac{5}{2}", "2.5", True),
    (r"\frac{5}{2}", "5", False),
]


def test_the_table_is_big_and_balanced():
    assert len(PAIRS) >= 40
    assert sum(1 for *_, eq in PAIRS if not eq) >= 15


@pytest.mark.parametrize("gold,pred,equivalent", PAIRS, ids=[f"{g}|{p}" for g, p, _ in PAIRS])
def test_verification_table(gold, pred, equivalent):
    ok, reason = verify_answer(gold, pred, LENIENT)
    assert ok is equivalent, f"{gold!r} vs {pred!r}: {reason}"
    assert reason == ("correct" if equivalent else "wrong")
    # The full reward path agrees when the candidate is boxed in a response.
    out = math_reward(f"Reasoning... so the answer is $\\boxed{{{pred}}}$.", gold, LENIENT)
    assert out["reward"] == (1.0 if equivalent else 0.0)
    assert out["extracted"] == pred and out["strategy"] == "boxed"


@pytest.mark.parametrize(
    "text,want",
    [
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\boxed{a^{b^{c}}} end", "a^{b^{c}}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5 done", "5"),
        (r"\boxed{3} and a truncated \boxed{4", "3"),  # unclosed last box: fall back to the previous one
        ("no box here", None),
        (r"\boxedx{3}", None),
    ],
)
def test_last_boxed(text, want):
    assert last_boxed(text) == want


def test_hash_and_last_number():
    assert hash_answer("work\n#### 72\n") == "72"
    assert hash_answer("#### 1\nmore\n#### $3.5$.") == "3.5"
    assert hash_answer("nothing") is None
    assert last_number("we get 3 apples and 1,234.5 pears") == "1234.5"
    assert last_number("ratio is -3/4") == "-3/4"
    assert last_number("the value is -.5") == "-.5"
    assert last_number("no digits") is None


def test_strategy_order_and_think_marker():
    text = "<think>maybe \\boxed{1}, 99</think> #### 3\nand finally 4"
    # Only the text after </think> is searched: hash wins over last_number in the default order.
    assert extract_answer(text) == ("3", "hash")
    assert extract_answer(text, MathRewardConfig(strategies=["last_number", "hash"])) == ("4", "last_number")
    assert extract_answer(text, MathRewardConfig(strategies=["boxed"])) == (None, None)
    assert extract_answer(text, MathRewardConfig(strategies=["boxed"], answer_after=None)) == ("1", "boxed")
    out = math_reward("I give up.", "5", MathRewardConfig(strategies=["boxed"]))
    assert out == {"reward": 0.0, "extracted": None, "reason": "no_answer", "strategy": None}


def test_reference_with_worked_solution_and_custom_rewards():
    assert reference_answer(r"so $x = \boxed{\frac{3}{5}}$") == r"\frac{3}{5}"
    cfg = MathRewardConfig(correct_reward=2.0, wrong_reward=-1.0)
    assert math_reward(r"\boxed{0.6}", r"... \boxed{\frac{3}{5}}", cfg)["reward"] == 2.0
    assert math_reward(r"\boxed{0.7}", r"... \boxed{\frac{3}{5}}", cfg)["reward"] == -1.0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="duplicates"):
        MathRewardConfig(strategies=["boxed", "boxed"])
    with pytest.raises(ValueError, match="strategies"):
        MathRewardConfig(strategies=["regex"])
    with pytest.raises(ValueError, match="timeout_s"):
        MathRewardConfig(timeout_s=0)


# 10^(10^10) makes sympy build a 10-billion-digit integer when it compares: a check that would run for minutes.
SLOW_REFERENCE = "10^{10^{10}}"


def test_timeout_in_main_thread_is_bounded():
    t0 = time.monotonic()
    out = math_reward(r"\boxed{5}", SLOW_REFERENCE, MathRewardConfig(timeout_s=0.5))
    elapsed = time.monotonic() - t0
    assert out["reward"] == 0.0 and out["reason"] == "timeout" and out["extracted"] == "5"
    assert elapsed < 3.0
    # The next check works normally (the timer was disarmed and the handler restored).
    assert math_reward(r"\boxed{2}", "2")["reason"] == "correct"


def test_timeout_in_worker_process_from_a_thread():
    # Outside the main thread SIGALRM is unavailable: the check runs in a worker process that is killed on timeout.
    results = {}

    def run():
        cfg = MathRewardConfig(timeout_s=1.0)
        verify_answer("1", "1", cfg)  # start the worker outside the timed measurement
        results["pid"] = _WORKER._proc.pid
        t0 = time.monotonic()
        results["slow"] = math_reward(r"\boxed{5}", SLOW_REFERENCE, cfg)
        results["elapsed"] = time.monotonic() - t0
        results["after"] = math_reward(r"\boxed{\sqrt{8}}", r"2\sqrt{2}", LENIENT)  # a fresh worker takes over

    th = threading.Thread(target=run)
    th.start()
    th.join(timeout=120)
    assert not th.is_alive(), "math reward thread did not finish within 120 s"
    assert results["slow"]["reason"] == "timeout" and results["slow"]["reward"] == 0.0
    assert results["elapsed"] < 4.0
    assert results["after"]["reason"] == "correct"
    # The overrunning worker was killed (not left burning CPU), and its successor also serves the main thread.
    with pytest.raises(ProcessLookupError):
        os.kill(results["pid"], 0)
    assert verify_answer("2", "2.0", MathRewardConfig(timeout_mode="process", timeout_s=60)) == (True, "correct")
