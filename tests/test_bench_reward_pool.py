"""The reward-pool benchmark runs end to end on a small mix (its numbers are for docs/benchmarks.md, not tests)."""

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_reward_pool.py"


def test_bench_reward_pool_scores_the_same_rewards_in_every_config_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_reward_pool", TOOL)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--workers", "2", "--responses", "6", "--group", "3", "--out", str(out)])
    assert json.loads(out.read_text())["rows"].keys() == {"serial", "pool@2"}
    # correct 3 programs, wrong 1, slow 3, sleeper 3, crash 1, syntax 1 (early exit after the first failure)
    assert all(r["programs"] == 12 for r in result["rows"].values())
    assert result["reward_mean"] == 3 / 6  # correct, slow and sleeper pass
    assert all(r["programs_per_s"] > 0 for r in result["rows"].values())
