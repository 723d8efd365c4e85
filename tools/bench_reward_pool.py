"""Benchmark the reward pool: sandboxed programs scored per second with 1, 2 and 4 workers against a serial loop.

A fixed set of real-looking competitive-programming answers is scored against stdin/stdout tests (3 tests each)
with :func:`oapl_megatron.tasks.code_reward.code_reward`, exactly as the code task scores a response (early exit
on the first failing test, per-test wall limit 20 s so that load never changes a verdict):

* ``correct``  reads n numbers and prints their sum (passes all 3 tests);
* ``wrong``    prints the maximum instead (fails the first test: early exit, 1 program);
* ``slow``     computes the right answer after a 0.3 s busy loop per test (3 programs, CPU-bound);
* ``sleeper``  sleeps 0.3 s per test, then answers (3 programs, wall-bound, no CPU);
* ``crash``    raises an exception (runtime error on the first test);
* ``syntax``   does not compile.

The mix repeats to ``--responses`` responses, grouped in groups of ``--group`` (G). ``serial`` scores them in a
plain loop on the calling thread; ``pool@N`` submits every group to :class:`RewardPool` with N workers and waits
for all deliveries. Throughput = sandbox programs run / wall time. Every configuration must give the same rewards
(checked). Prints a table and writes JSON (``--out``).

    python tools/bench_reward_pool.py --workers 1 2 4 --responses 96 --out docs/results/bench_reward_pool.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

TESTS = {"inputs": ["3\n1 2 3\n", "4\n10 -5 7 1\n", "1\n42\n"], "outputs": ["6\n", "13\n", "42\n"]}
PROGRAMS = {
    "correct": "n = int(input())\nprint(sum(map(int, input().split())))\n",
    "wrong": "n = int(input())\nprint(max(map(int, input().split())))\n",
    "slow": ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\n"
             "n = int(input())\nprint(sum(map(int, input().split())))\n"),
    "sleeper": "import time\ntime.sleep(0.3)\nn = int(input())\nprint(sum(map(int, input().split())))\n",
    "crash": "n = int(input())\nraise RuntimeError('unexpected input')\n",
    "syntax": "def f(:\n    return 1\n",
}


def make_scorer(cfg):
    from oapl_megatron.tasks.base import RewardResult
    from oapl_megatron.tasks.code_reward import code_reward

    def score(prompt, response):
        out = code_reward(f"```python\n{response}```", TESTS, cfg)
        runs = sum(1 for d in out["details"] if d["reason"] != "skipped")
        return RewardResult(out["reward"], {"reason": out["error"] or "passed", "sandbox_runs": runs})

    return score


def run_serial(score, responses):
    from oapl_megatron.tasks.base import Prompt

    t0 = time.perf_counter()
    results = [score(Prompt("bench", "", ""), r) for r in responses]
    return time.perf_counter() - t0, results


def run_pool(score, responses, group: int, workers: int):
    from oapl_megatron.tasks.base import Prompt
    from oapl_megatron.tasks.reward_pool import RewardPool

    got: dict[int, list] = {}
    pool = RewardPool(score, workers=workers, deliver=lambda k, res: got.__setitem__(k, res)).start()
    t0 = time.perf_counter()
    for k in range(0, len(responses), group):
        pool.submit(Prompt(f"bench{k}", "", ""), responses[k : k + group], payload=k)
    pool.drain(timeout=3600)
    wall = time.perf_counter() - t0
    pool.close()
    return wall, [r for k in sorted(got) for r in got[k]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="pool sizes to measure")
    ap.add_argument("--responses", type=int, default=96, help="responses scored per configuration")
    ap.add_argument("--group", type=int, default=8, help="responses per group (G)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration (the median is reported)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)

    from oapl_megatron.config.sandbox import CodeRewardConfig, SandboxConfig
    from oapl_megatron.tasks.sandbox import isolation_report

    # A generous wall limit: on a shared machine a starved "slow" program must not time out, or the rewards (checked
    # equal across configurations) would depend on the load instead of the programs.
    sandbox = SandboxConfig(wall_timeout_s=20.0, cpu_time_s=2, memory_bytes=256 * 2**20)
    # One test at a time inside a response: parallelism comes from the pool, as in training.
    cfg = CodeRewardConfig(num_workers=1, stop_on_first_failure=True, sandbox=sandbox)
    score = make_scorer(cfg)
    names = list(PROGRAMS)
    responses = [PROGRAMS[names[i % len(names)]] for i in range(args.responses)]
    configs = [("serial", None)] + [(f"pool@{w}", w) for w in args.workers]
    rows, reference = {}, None
    for label, w in configs:
        walls, runs = [], 0
        for _ in range(args.repeats):
            wall, results = run_serial(score, responses) if w is None else run_pool(score, responses, args.group, w)
            rewards = [r.reward for r in results]
            reference = reference or rewards
            if rewards != reference:
                reasons = sorted({r.info["reason"] for r in results})
                raise RuntimeError(f"{label}: rewards differ from the serial loop's (verdicts seen: {reasons})")
            walls.append(wall)
            runs = sum(r.info["sandbox_runs"] for r in results)
        wall = sorted(walls)[len(walls) // 2]
        rows[label] = {"workers": w or 1, "wall_s": wall, "programs": runs, "programs_per_s": runs / wall,
                       "responses_per_s": len(responses) / wall}
    base = rows["serial"]["programs_per_s"]
    for r in rows.values():
        r["speedup_vs_serial"] = r["programs_per_s"] / base
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "isolation": list(isolation_report(sandbox)),
        "command": "python tools/bench_reward_pool.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mix": {k: sum(r == PROGRAMS[k] for r in responses) for k in names} | {"responses": args.responses,
                                                                                 "group": args.group},
        "reward_mean": sum(reference) / len(reference),
        "rows": rows,
    }
    print(f"{'config':>10s} {'workers':>8s} {'wall s':>8s} {'programs':>9s} {'programs/s':>11s} {'speedup':>8s}")
    for label, r in rows.items():
        print(f"{label:>10s} {r['workers']:8d} {r['wall_s']:8.2f} {r['programs']:9d} {r['programs_per_s']:11.1f} "
              f"{r['speedup_vs_serial']:7.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
