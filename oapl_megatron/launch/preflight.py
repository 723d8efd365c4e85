"""Pre-flight check of every node of a job: a GEMM on each device and a collective over all nodes.

Run as one task per node (``srun --het-group=0,1 --ntasks-per-node=1``; rank = SLURM_PROCID, world =
SLURM_NTASKS, or ``--rank/--world``)::

    python -m oapl_megatron.launch.preflight --master HEAD:PORT --out LOGDIR/preflight [--slow-ratio 0.5]

Each node times a square matmul on every visible GPU (bf16, n=8192) or on the CPU (fp32, n=512), then joins a
gloo all-reduce of 16 MiB with every other node (the network path the rendezvous and the weight sync rely on).
Rank 0 hosts the store, waits ≤ ``--timeout-s`` for every node (naming the ones that never report), compares
GEMM rates with the median (below ``--slow-ratio`` × median = slow), prints a table, writes ``preflight.json``
and ``summary.txt``. Exit 1 on every node when a node failed or is missing (and, with ``--fail-slow``, when one
is slow), so the batch script stops before training starts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path


def gemm_rates(n: int | None = None, iters: int = 5) -> list[dict]:
    """TFLOP/s of an n×n matmul on every visible GPU, or on the CPU; an exception becomes ``error``."""
    import torch

    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [torch.device("cpu")]
    out = []
    for dev in devices:
        try:
            size = n or (8192 if dev.type == "cuda" else 512)
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            a = torch.randn(size, size, device=dev, dtype=dtype)
            b = torch.randn(size, size, device=dev, dtype=dtype)
            (a @ b).sum().item()  # warm-up (cuBLAS handles, CPU thread pool)
            t0 = time.perf_counter()
            for _ in range(iters):
                c = a @ b
            float(c[0, 0])  # synchronizes on GPU
            dt = time.perf_counter() - t0
            finite = bool(torch.isfinite(c).all())
            out.append({"device": str(dev), "n": size, "tflops": 2 * size**3 * iters / dt / 1e12,
                        "ok": finite, "error": None if finite else "non-finite GEMM result"})
        except Exception as e:  # a broken GPU must be reported, not crash the check before it reports
            out.append({"device": str(dev), "n": n, "tflops": 0.0, "ok": False, "error": f"{type(e).__name__}: {e}"})
    return out


def classify(nodes: dict[int, dict], world: int, slow_ratio: float) -> dict:
    """Pure verdict over the per-node reports: missing ranks, failing nodes, slow devices (rate < ratio·median)."""
    missing = [r for r in range(world) if r not in nodes]
    failing = {nodes[r]["host"]: [d["error"] for d in nodes[r]["gemm"] if not d["ok"]] or [nodes[r].get("error")]
               for r in nodes if not nodes[r]["ok"]}
    rates = [d["tflops"] for r in nodes for d in nodes[r]["gemm"] if d["ok"]]
    median = statistics.median(rates) if rates else 0.0
    slow = {f"{nodes[r]['host']}/{d['device']}": round(d["tflops"], 4)
            for r in sorted(nodes) for d in nodes[r]["gemm"] if d["ok"] and d["tflops"] < slow_ratio * median}
    return {"world": world, "missing_ranks": missing, "failing": failing, "slow": slow,
            "median_tflops": median, "ok": not missing and not failing}


def _table(nodes: dict[int, dict]) -> str:
    rows = [f"{'rank':>4} {'host':20s} {'device':8s} {'TFLOP/s':>9} {'allreduce s':>11}  status"]
    for r in sorted(nodes):
        n = nodes[r]
        for d in n["gemm"]:
            ar = f"{n['allreduce_s']:.3f}" if n.get("allreduce_s") is not None else "-"
            rows.append(f"{r:>4} {n['host'][:20]:20s} {d['device']:8s} {d['tflops']:9.3f} {ar:>11}  "
                        f"{'ok' if d['ok'] else d['error']}")
    return "\n".join(rows)


def _collect(store, prefix: str, ranks, timeout_s: float) -> dict[int, dict]:
    """Rank 0: the reports ``prefix/<r>`` that arrive within ``timeout_s``."""
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < len(ranks) and time.monotonic() < deadline:
        for r in ranks:
            if r not in got and store.check([f"{prefix}/{r}"]):
                got[r] = json.loads(store.get(f"{prefix}/{r}"))
        time.sleep(0.2)
    return got


def run(master: str, rank: int, world: int, out: Path, slow_ratio: float, fail_slow: bool,
        timeout_s: float) -> int:
    """Collective over ``world`` node tasks (see the module docstring); returns the process exit code."""
    import torch
    import torch.distributed as dist

    host, port = master.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    me = {"rank": rank, "host": socket.gethostname(), "node": os.environ.get("SLURMD_NODENAME", ""),
          "gemm": gemm_rates(), "allreduce_s": None, "error": None}
    me["ok"] = all(d["ok"] for d in me["gemm"])
    store.set(f"gemm/{rank}", json.dumps(me))
    # Phase 1: every node reports its GEMM; rank 0 names the nodes that never do (no collective hangs on them).
    if rank == 0:
        nodes = _collect(store, "gemm", range(world), timeout_s)
        store.set("go", "yes" if len(nodes) == world else "no")
    else:
        store.wait(["go"], timedelta(seconds=timeout_s + 60))
    if store.get("go").decode() == "yes":
        # Phase 2: a gloo all-reduce over all nodes (the network path of the rendezvous and the weight sync).
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
            x = torch.ones(4 * 2**20)  # 16 MiB
            dist.all_reduce(x)  # warm-up: connections
            t0 = time.perf_counter()
            dist.all_reduce(x)
            me["allreduce_s"] = time.perf_counter() - t0
            if float(x[0]) != world * world:
                me["error"] = f"all-reduce returned {float(x[0])}, expected {world * world}"
            dist.destroy_process_group()
        except Exception as e:
            me["error"] = f"collective: {type(e).__name__}: {e}"
    me["ok"] = me["error"] is None and all(d["ok"] for d in me["gemm"])
    store.set(f"node/{rank}", json.dumps(me))
    if rank != 0:
        store.wait(["verdict"], timedelta(seconds=timeout_s + 60))
        verdict = store.get("verdict").decode()
        store.set(f"read/{rank}", "1")
        print(f"{me['host']}: GEMM {[round(d['tflops'], 3) for d in me['gemm']]} TFLOP/s, all-reduce "
              f"{me['allreduce_s']} s → job verdict {verdict}", flush=True)
        return 0 if verdict == "ok" else 1
    if store.get("go").decode() == "yes":
        nodes = _collect(store, "node", range(world), timeout_s)
    verdict = classify(nodes, world, slow_ratio)
    bad = not verdict["ok"] or (fail_slow and bool(verdict["slow"]))
    parts = [f"{len(nodes)}/{world} nodes reported, median GEMM {verdict['median_tflops']:.3f} TFLOP/s"]
    if verdict["missing_ranks"]:
        parts.append(f"MISSING ranks {verdict['missing_ranks']} (no report within {timeout_s:.0f}s)")
    if verdict["failing"]:
        parts.append(f"FAILING {verdict['failing']}")
    if verdict["slow"]:
        parts.append(f"SLOW (< {slow_ratio}x median) {verdict['slow']}")
    summary = "; ".join(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preflight.json").write_text(json.dumps({"verdict": verdict, "nodes": nodes}, indent=2))
    (out / "summary.txt").write_text(summary + "\n")
    print(_table(nodes) + "\n" + summary, flush=True)
    store.set("verdict", "fail" if bad else "ok")
    others = [f"read/{r}" for r in nodes if r != 0]
    if others:  # keep the store up until every node that reported has read the verdict
        try:
            store.wait(others, timedelta(seconds=30))
        except Exception:
            pass
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--master", required=True, help="HOST:PORT of rank 0's store")
    ap.add_argument("--rank", type=int, default=int(os.environ.get("SLURM_PROCID", 0)))
    ap.add_argument("--world", type=int, default=int(os.environ.get("SLURM_NTASKS", 1)))
    ap.add_argument("--out", required=True, type=Path, help="rank 0 writes preflight.json and summary.txt here")
    ap.add_argument("--slow-ratio", type=float, default=0.5)
    ap.add_argument("--fail-slow", action="store_true", help="also fail when a node is slow")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    args = ap.parse_args(argv)
    return run(args.master, args.rank, args.world, args.out, args.slow_ratio, args.fail_slow, args.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
