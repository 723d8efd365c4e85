"""Fault-tolerance pieces on their own: the re-issue accounting, the liveness check (with real heartbeat processes
that are stopped, killed, or answer with the wrong key), the consecutive-skip stop, reward errors, resume candidates.

The whole loop under faults is tests/test_chaos.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from oapl_megatron.orchestrator.faults import (FaultState, TooManySkips, marker_problem, resume_candidates,
                                               save_or_report)
from oapl_megatron.rollout.liveness import LivenessMonitor, LivenessTracker
from oapl_megatron.rollout.reissue import Ledger
from oapl_megatron.rollout.types import Sample

REPO = Path(__file__).resolve().parents[1]


def _samples(indexes, n, version, engine):
    return [Sample(prompt_id=i, prompt_token_ids=(1,), token_ids=(2, 3), token_logprobs=(-0.1, -0.2),
                   finish_reason="stop", policy_version=version, engine_id=engine, sample_index=k)
            for i in indexes for k in range(n)]


# ---------------------------------------------------------------------------------------------- re-issue accounting


def test_reissued_groups_are_neither_lost_nor_counted_twice():
    n = 3
    ledger = Ledger(6, n)
    a0 = ledger.assign((0, 0), [0, 1, 2])
    a1 = ledger.assign((1, 0), [3, 4, 5])
    assert ledger.complete(a1, _samples([3, 4, 5], n, version=4, engine=1))
    assert not ledger.done()
    # engine 0 dies: the monitor and the failed request both report it; its requests are re-issued once
    again = ledger.abandon_engine((0, 0))
    assert again == [0, 1, 2]
    assert ledger.abandon(a0) == [] and ledger.abandon_engine((0, 0)) == []
    with pytest.raises(RuntimeError, match="have no samples"):
        ledger.results()
    a2 = ledger.assign((1, 0), again[:2])
    a3 = ledger.assign((0, 1), again[2:])  # engine 0's next incarnation, after its restart
    # the dead engine's late reply is ignored: its samples never reach the trainer
    assert not ledger.complete(a0, _samples([0, 1, 2], n, version=3, engine=0))
    assert ledger.late_replies == 1
    assert ledger.complete(a2, _samples([0, 1], n, version=4, engine=1))
    assert ledger.complete(a3, _samples([2], n, version=4, engine=0))
    assert ledger.done() and ledger.reissued == 3
    out = ledger.results()
    assert [s.prompt_id for s in out] == [i for i in range(6) for _ in range(n)]  # request order, n each
    assert all(s.policy_version == 4 for s in out)  # each group whole from the one engine that generated it


def test_ledger_refuses_double_assignment_and_wrong_sample_counts():
    ledger = Ledger(2, 2)
    a = ledger.assign((0, 0), [0])
    with pytest.raises(RuntimeError, match="assigned twice"):
        ledger.assign((1, 0), [0])
    with pytest.raises(RuntimeError, match="returned 1 samples"):
        ledger.complete(a, _samples([0], 1, version=0, engine=0))
    assert ledger.complete(a, _samples([0], 2, version=0, engine=0))
    with pytest.raises(RuntimeError, match="assigned twice"):
        ledger.assign((1, 0), [0])  # done requests are never sent again
    assert ledger.running_engines() == set()


# ---------------------------------------------------------------------------------------------- liveness


class _Exited:
    def __init__(self, code):
        self.returncode = code

    def poll(self):
        return self.returncode


def test_liveness_tracker_declares_silence_and_exit_once():
    t = LivenessTracker(timeout_s=5.0)
    t.watch(0, ("127.0.0.1", 1), b"k", None, now=100.0)
    t.watch(1, ("127.0.0.1", 2), b"k", None, now=100.0)
    t.watch(2, ("127.0.0.1", 3), b"k", _Exited(-9), now=100.0)
    assert t.overdue(101.0) == [(2, "process exited with code -9")]  # at once, not after the timeout
    t.reply(0, 104.0)
    assert t.overdue(105.0) == []  # 5.0 s of silence is not more than the timeout
    dead = t.overdue(105.5)
    assert [i for i, _ in dead] == [1] and "no heartbeat for 5.5s" in dead[0][1]
    assert t.overdue(200.0) == [(0, "no heartbeat for 96.0s (timeout 5.0s)")]
    assert t.overdue(300.0) == [] and t.watched == {}  # each death is reported once
    with pytest.raises(ValueError):
        LivenessTracker(0.0)


_RESPONDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from oapl_megatron.rollout.liveness import HeartbeatResponder
    hb = HeartbeatResponder("127.0.0.1", bytes.fromhex(sys.argv[1]), int(sys.argv[2]))
    print(hb.port, flush=True)
    time.sleep(float(sys.argv[3]))
""")


def _responder(key: bytes, engine_id: int, live_s: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", _RESPONDER.format(repo=str(REPO)), key.hex(), str(engine_id),
                             str(live_s)], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_liveness_monitor_with_real_processes():
    """Three heartbeat servers in real processes: one keeps answering, one is SIGSTOPped, one exits; a fourth
    answers with the wrong key. Only the healthy one survives, each death is reported once, and a stopped one is
    declared dead about one timeout after it stopped, not before."""
    key, interval, timeout = os.urandom(16), 0.2, 1.5
    deaths: list[tuple[int, str, float]] = []
    lock = threading.Lock()

    def on_dead(i, reason):
        with lock:
            deaths.append((i, reason, time.monotonic()))

    procs = [_responder(key, 0, 60), _responder(key, 1, 60), _responder(key, 2, 2.5), _responder(os.urandom(16), 3, 60)]
    mon = LivenessMonitor(on_dead, interval_s=interval, timeout_s=timeout).start()
    try:
        for i, (p, port) in enumerate(procs):
            mon.watch(i, ("127.0.0.1", port), key, p)
        time.sleep(1.0)
        os.kill(procs[1][0].pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        time.sleep(timeout + 3.0)
        with lock:
            got = {i: (reason, t) for i, reason, t in deaths}
        assert sorted(got) == [1, 2, 3], deaths
        assert len(deaths) == 3
        # silence counts from the last reply, at most one beat before the stop
        assert "no heartbeat" in got[1][0], got[1]
        assert timeout - interval - 0.1 <= got[1][1] - t_stop <= timeout + 3 * interval + 0.5, got[1][1] - t_stop
        assert "process exited with code 0" in got[2][0]
        assert "no heartbeat" in got[3][0]  # answers signed with another key do not count
        assert mon.watching() == {0}
    finally:
        mon.stop()
        for p, _ in procs:
            p.kill()
            p.wait()
    with pytest.raises(ValueError, match="below the liveness timeout"):
        LivenessMonitor(on_dead, interval_s=2.0, timeout_s=2.0)


def test_rollout_config_rejects_a_heartbeat_slower_than_the_timeout():
    from pydantic import ValidationError

    from oapl_megatron.config.rollout import RolloutConfig

    with pytest.raises(ValidationError, match="heartbeat_interval_s"):
        RolloutConfig(heartbeat_interval_s=30.0, liveness_timeout_s=10.0)


# ---------------------------------------------------------------------------------------------- bad steps


def test_skipped_steps_are_counted_logged_and_stop_the_run():
    lines = []
    f = FaultState(max_consecutive_skips=3)
    for step, skipped in enumerate([1.0, 0.0, 1.0, 1.0], start=1):
        m = {"skipped": skipped, "skipped_total": float(step != 2) + (step > 2) * (step - 2), "loss": float("nan")}
        f.after_step(step, m, log=lines.append)
        assert m["skipped_steps"] == m["skipped_total"]
    assert f.consecutive_skips == 2 and len(lines) == 3
    assert "step 4: optimizer step skipped" in lines[-1] and "2 in a row" in lines[-1]
    with pytest.raises(TooManySkips, match="3 consecutive optimizer steps .up to step 5"):
        f.after_step(5, {"skipped": 1.0, "skipped_total": 4.0}, log=lines.append)
    never = FaultState(max_consecutive_skips=0)
    for step in range(50):
        never.after_step(step, {"skipped": 1.0, "skipped_total": float(step)})


def test_a_reward_that_raises_scores_zero_and_is_counted(tmp_path):
    from oapl_megatron.config.loop import LoopConfig
    from oapl_megatron.config.rollout import RolloutConfig
    from oapl_megatron.config.task import SyntheticTaskConfig
    from oapl_megatron.rollout.buffer import RolloutBuffer
    from oapl_megatron.rollout.producer import RolloutProducer
    from oapl_megatron.tasks.synthetic import SyntheticArithmeticTask
    from oapl_megatron.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(tmp_path)
    task = SyntheticArithmeticTask(SyntheticTaskConfig(), eos_text=tok.eos_token)
    real_reward = task.reward

    def flaky(prompt, text):
        if "7" in text:
            raise ZeroDivisionError("grader bug")
        return real_reward(prompt, text)

    task.reward = flaky
    producer = RolloutProducer(None, task, tok, RolloutBuffer(4), RolloutConfig(), LoopConfig(), group_size=2,
                               seed=0)
    prompt = next(task.train_prompts(0))

    def sample(text):
        ids = tuple(tok.encode(text, add_special_tokens=False)) + (tok.eos_token_id,)
        return Sample(prompt_id=0, prompt_token_ids=(1,), token_ids=ids, token_logprobs=(0.0,) * len(ids),
                      finish_reason="stop", policy_version=0, engine_id=0)

    assert producer._score(prompt, sample("1+7=8\n#8")) == 0.0  # raised: scored as a wrong answer
    assert producer.reward_errors == 1
    right = f"#{prompt.answer}".replace("7", "")  # a text the flaky grader accepts
    assert producer._score(prompt, sample(right)) == real_reward(prompt, right + tok.eos_token).reward
    assert producer.reward_errors == 1
    if "7" not in prompt.answer:
        assert producer._score(prompt, sample(f"#{prompt.answer}")) == 1.0


# ---------------------------------------------------------------------------------------------- storage


def test_resume_candidates_newest_first_and_marker_problems(tmp_path):
    for step, marker in [(4, '{"step": 4}'), (8, None), (12, "{not json"), (16, '{"step": 15}')]:
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        if marker is not None:
            (d / "COMPLETE").write_text(marker)
    (tmp_path / ".tmp_step_00000020").mkdir()
    cands = resume_candidates(tmp_path)
    assert [p.name for p in cands] == [f"step_{s:08d}" for s in (16, 12, 8, 4)]
    problems = [marker_problem(p) for p in cands]
    assert "does not name step 16" in problems[0]
    assert "unreadable" in problems[1] and "missing" in problems[2] and problems[3] is None
    assert resume_candidates(tmp_path / "nowhere") == []


def test_a_failing_save_is_reported_counted_and_optionally_fatal(tmp_path):
    """A real write into a read-only directory tree fails with OSError; the run goes on unless told to stop."""
    from oapl_megatron.trainer.checkpoint import CheckpointError

    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=False)
    mounted = subprocess.run(["mountpoint", "-q", str(ro)]).returncode == 0
    try:
        def save():
            (ro / "x").write_text("y")  # PermissionError or a read-only filesystem: both OSError
            return 0.0

        if not mounted:
            os.chmod(ro, 0o500)
            if os.geteuid() == 0:
                pytest.skip("cannot mount a tmpfs here and root ignores permissions")
        faults, lines = FaultState(), []
        seconds, err = save_or_report(save, 7, faults, stop_on_error=False, log=lines.append, previous=tmp_path / "p")
        assert err is not None and faults.checkpoint_failures == 1
        assert "checkpoint at step 7 FAILED" in lines[0] and "is intact" in lines[0] and "goes on" in lines[0]

        def bad():
            raise CheckpointError("rank 0: disk full")

        with pytest.raises(CheckpointError):
            save_or_report(bad, 8, faults, stop_on_error=True, log=lines.append, previous=None)
        assert faults.checkpoint_failures == 2 and "stopping" in lines[-1]
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=False)
