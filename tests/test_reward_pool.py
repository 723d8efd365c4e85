"""The reward pool: every group is delivered exactly once, fully scored, in submission order, whatever order its
responses finish in; each response is scored exactly once; failures and timeouts name the group; backpressure and
drain work; with the real synthetic code task the programs really run in the sandbox (programs_per_s counted).

Run: ``python -m pytest tests/test_reward_pool.py -q`` (about 5 s on an idle 2-core machine).
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from oapl_megatron.config.code import SyntheticCodeTaskConfig
from oapl_megatron.tasks.base import Prompt, RewardResult
from oapl_megatron.tasks.reward_pool import RewardPool, RewardPoolError
from oapl_megatron.tasks.synthetic_code import SyntheticCodeTask


class SleepyScorer:
    """A real scorer whose latency varies per response (so responses finish out of order); it records each call."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []

    def __call__(self, prompt: Prompt, text: str) -> RewardResult:
        with self.lock:
            delay = self.rng.uniform(0, 0.01)
            self.calls.append((prompt.id, text))
        time.sleep(delay)
        return RewardResult(float(len(text) % 2), {"reason": "odd" if len(text) % 2 else "even", "sandbox_runs": 1})


def test_groups_arrive_once_in_order_with_their_own_scores():
    scorer = SleepyScorer()
    got: list[tuple[int, list[float]]] = []
    pool = RewardPool(scorer, workers=4, deliver=lambda payload, res: got.append((payload, [r.reward for r in res])))
    pool.start()
    groups = []
    for g in range(40):
        texts = ["x" * random.Random(g * 10 + i).randint(1, 9) for i in range(5)]
        groups.append(texts)
        pool.submit(Prompt(f"p{g}", "", ""), texts, payload=g)
    pool.drain(timeout=60)
    pool.close()
    assert [p for p, _ in got] == list(range(40))  # order kept, nothing lost or repeated
    assert all(scores == [float(len(t) % 2) for t in groups[p]] for p, scores in got)  # each group its own scores
    assert sorted(scorer.calls) == sorted((f"p{g}", t) for g, texts in enumerate(groups) for t in texts)  # once each
    s = pool.stats()
    assert (s["groups_submitted"], s["groups_delivered"], s["groups_pending"], s["responses_scored"]) == (40, 40, 0,
                                                                                                           200)
    assert s["sandbox_runs"] == 200 and sum(s["reasons"].values()) == 200 and s["busy_s"] > 0
    assert pool.delivered_tickets == list(range(40))


def test_scorer_failure_stops_the_pool_and_names_the_group():
    def score(prompt, text):
        if text == "boom":
            raise ValueError("sandbox exploded")
        return RewardResult(1.0)

    got, errors = [], []
    pool = RewardPool(score, workers=2, deliver=lambda p, r: got.append(p), on_error=errors.append).start()
    pool.submit(Prompt("a", "", ""), ["ok", "ok"], 0)
    pool.submit(Prompt("b", "", ""), ["ok", "boom"], 1)
    pool.submit(Prompt("c", "", ""), ["ok"], 2)
    with pytest.raises(RewardPoolError, match=r"group 1 \(prompt b\) ValueError: sandbox exploded"):
        pool.drain(timeout=30)
    assert got == [0]  # the failed group and everything after it were not delivered
    assert len(errors) == 1 and "prompt b" in str(errors[0])  # the consumer was told once
    with pytest.raises(RewardPoolError):
        pool.submit(Prompt("d", "", ""), ["ok"], 3)
    pool.close()


def test_group_timeout_is_an_error_naming_the_group():
    pool = RewardPool(lambda p, t: (time.sleep(2), RewardResult(0.0))[1], workers=1, deliver=lambda p, r: None,
                      timeout_s=0.3).start()
    pool.submit(Prompt("slow", "", ""), ["x"], 0)
    with pytest.raises(RewardPoolError, match=r"group 0 \(prompt slow\) timed out.*timeout_s=0.3"):
        pool.drain(timeout=30)
    pool.close()


def test_backpressure_waits_for_deliveries():
    release = threading.Event()
    pool = RewardPool(lambda p, t: (release.wait(10), RewardResult(1.0))[1], workers=2,
                      deliver=lambda p, r: None).start()
    for i in range(3):
        pool.submit(Prompt(str(i), "", ""), ["x"], i)
    assert pool.pending() == 3
    assert pool.wait_for_room(max_pending=3, timeout=0.2) is False
    release.set()
    assert pool.wait_for_room(max_pending=1, timeout=10) is True
    pool.drain(timeout=10)
    pool.close()


def test_synthetic_code_rewards_run_in_the_sandbox_through_the_pool():
    task = SyntheticCodeTask(SyntheticCodeTaskConfig(reward_pool={"workers": 2}))
    prompts = task.eval_prompts()[:4]
    eos = task.eos_text
    got = {}
    pool = RewardPool(task.reward, workers=task.reward_workers,
                      deliver=lambda p, res: got.__setitem__(p, [(r.reward, r.info["reason"]) for r in res])).start()
    for i, p in enumerate(prompts):
        pool.submit(p, [task.solution(p) + eos, "print(-1)" + eos, task.solution(p)[:-1] + eos, task.solution(p)],
                    payload=i)
    pool.drain(timeout=120)
    pool.close()
    for i in range(4):
        assert got[i] == [(1.0, "passed"), (0.0, "wrong_answer"), (0.0, "runtime_error"), (0.0, "no_eos")]
    s = pool.stats()
    assert s["sandbox_runs"] == 12 and s["programs_per_s"] > 0  # the no-EOS response never started a program


def test_close_accounts_for_every_group():
    """Closing mid-stream: submitted == delivered + dropped_at_close, whatever was in flight."""
    gate = threading.Event()

    def score(prompt, text):
        if prompt.id != "p0":
            gate.wait(5)
        return RewardResult(1.0)

    got = []
    pool = RewardPool(score, workers=2, deliver=lambda p, r: got.append(p)).start()
    for i in range(6):
        pool.submit(Prompt(f"p{i}", "", ""), ["a", "b"], i)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.close(timeout=10)
    gate.set()
    s = pool.stats()
    assert got[0] == 0 and s["groups_submitted"] == 6
    assert s["groups_delivered"] + s["groups_dropped_at_close"] == 6 and s["groups_pending"] == 0
