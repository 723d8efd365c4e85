"""The weight-sync benchmark runs end to end on a tiny model (its numbers are for docs/benchmarks.md, not tests)."""

import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_weight_sync.py"


def test_bench_weight_sync_runs_every_method_and_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_weight_sync", TOOL)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--receivers", "2", "--layers", "2", "--hidden", "64", "--ffn", "128", "--vocab", "4096",
                         "--bucket-mb", "1", "--repeats", "1", "--timeout-s", "60", "--out", str(out)])
    assert json.loads(out.read_text())["model"] == result["model"]
    assert result["model"]["tensors"] == 2 * 11 + 3
    methods = set(result["median_s"])
    assert {"flat", "per_tensor", "per_tensor_rpc", "bucketed@1", "bucketed-bounded@1", "bucketed+crc32@1", "chunked@1", "flat+copy"} <= methods
    assert all(t > 0 for t in result["median_s"].values())
    # every process reported its CPU time for every method
    assert set(result["cpu_s_all_processes_median"]) == methods
    assert result["n_buckets"][1] == -(-result["model"]["bytes"] // 2**20)  # 1.1 MiB of weights: 2 buckets
