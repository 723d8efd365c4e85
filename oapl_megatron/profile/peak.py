"""``oapl-profile peak``: this machine's measured matrix-multiply peak and collective bandwidths.

- GEMM: the best FLOP/s of square matmuls (bf16 on a GPU, fp32 on CPU) over a few sizes, per rank, with every
  rank busy at once (so on a shared CPU it is the per-rank peak under full load, the MFU denominator the trainer
  actually has).
- Collectives: all-reduce and broadcast bus bandwidth over the world's default group (gloo on CPU, NCCL on GPU)
  at a few message sizes. Bus bandwidth follows nccl-tests: all-reduce moves 2·(n−1)/n of the message per rank,
  broadcast one message.

Run as a torchrun worker (``python -m oapl_megatron.profile.peak --out DIR``); ``oapl-profile peak --ranks N``
launches it and prints the table. Writes ``DIR/result.json`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist


def gemm_peak(device: torch.device, dtype: torch.dtype, sizes: list[int], min_time_s: float = 0.3) -> dict:
    """FLOP/s of C = A @ B per size (2·n³ FLOPs each); the best is the peak."""
    out = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up (allocations, kernel selection)
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            reps += 1
            if reps % 4 == 0:
                _sync(device)
                if time.perf_counter() - t0 >= min_time_s:
                    break
        dt = time.perf_counter() - t0
        out[n] = 2 * n**3 * reps / dt
    return out


def collective_bw(device: torch.device, sizes_mb: list[float], min_time_s: float = 0.3) -> list[dict]:
    """Bus bandwidth (bytes/s) of all_reduce and broadcast (fp32) over the default group."""
    world = dist.get_world_size()
    rows = []
    for mb in sizes_mb:
        t = torch.ones(max(1, int(mb * 2**20 / 4)), device=device)
        nbytes = t.numel() * 4
        for op in ("all_reduce", "broadcast"):
            fn = (lambda: dist.all_reduce(t)) if op == "all_reduce" else (lambda: dist.broadcast(t, src=0))
            fn()
            _sync(device)
            dist.barrier()
            reps, t0 = 0, time.perf_counter()
            while True:
                fn()
                reps += 1
                # every rank must agree when to stop: rank 0's clock decides
                flag = torch.tensor([1.0 if time.perf_counter() - t0 >= min_time_s else 0.0], device=device)
                dist.broadcast(flag, src=0)
                if flag.item():
                    break
            _sync(device)
            dt = (time.perf_counter() - t0) / reps
            factor = 2 * (world - 1) / world if op == "all_reduce" else 1.0
            rows.append({"op": op, "bytes": nbytes, "time_s": dt, "bus_bytes_per_s": factor * nbytes / dt,
                         "world_size": world})
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gemm-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--coll-mb", type=float, nargs="+", default=[1.0, 16.0])
    ap.add_argument("--min-time-s", type=float, default=0.3)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = args.gemm_sizes or ([4096, 8192] if cuda else [256, 512, 1024])
    dist.barrier()
    gemm = gemm_peak(device, dtype, sizes, args.min_time_s)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, gemm)
    coll = collective_bw(device, args.coll_mb, args.min_time_s) if world > 1 else []
    if rank == 0:
        best = [max(g.values()) for g in per_rank]
        result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype).split(".")[-1],
                  "world_size": world, "threads_per_rank": torch.get_num_threads(), "backend": backend,
                  "gemm_flops_per_rank": {str(n): sum(g[n] for g in per_rank) / world for n in sizes},
                  "peak_flops_per_rank": sum(best) / world, "collectives": coll}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


def format_peak(r: dict) -> str:
    lines = [f"device {r['device']} ({r['dtype']}), {r['world_size']} rank(s) × {r['threads_per_rank']} thread(s), "
             f"backend {r['backend']}",
             f"{'GEMM n':>10} {'GFLOP/s per rank':>18}"]
    for n, f in r["gemm_flops_per_rank"].items():
        lines.append(f"{n:>10} {f / 1e9:>18.2f}")
    lines.append(f"peak per rank: {r['peak_flops_per_rank'] / 1e9:.2f} GFLOP/s")
    if r["collectives"]:
        lines.append(f"{'collective':>12} {'MB':>8} {'ms':>9} {'bus GB/s':>9}")
        for c in r["collectives"]:
            lines.append(f"{c['op']:>12} {c['bytes'] / 2**20:>8.1f} {c['time_s'] * 1e3:>9.2f} "
                         f"{c['bus_bytes_per_s'] / 1e9:>9.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
