"""Benchmark the bucketed weight sync against a flat broadcast (the limit) and one broadcast per tensor.

A synthetic Qwen-like model (default ≈103M parameters in 244 named tensors, bf16) lives on the sender (rank 0);
N receiver processes (default 2) join a gloo group over loopback. Every method moves the same bytes:

* ``flat``        one broadcast of a single uint8 buffer holding every byte (no packing, no unpacking): the limit;
* ``per_tensor``  one broadcast per tensor, each waited before the next (as in one-tensor-at-a-time designs),
                  received into preallocated tensors; ``per_tensor_pipelined`` posts them all at once (best case);
* ``per_tensor_rpc`` one control-plane RPC per tensor, the way one-RPC-per-tensor designs load weights: the sender
                  pickles ``(name, tensor)`` by value and sends it as its own message over an authenticated
                  ``multiprocessing.connection`` link to every receiver (as the engine control plane does), then
                  waits for every receiver's ack before the next tensor (one round trip per tensor); each receiver
                  unpickles it and copies it into its preallocated destination. (Plain ``pickle``, not
                  ``conn.send``: torch registers shared-memory reducers with the ForkingPickler that ``conn.send``
                  uses, which would pass a file descriptor instead of the bytes, unlike a real RPC.)
* ``bucketed@MB`` :func:`oapl_megatron.weight_sync.sync.send_weights` / ``receive_weights``: pack into MB-MiB
                  buckets (double-buffered), broadcast each into the receivers' flat staging buffer, take the
                  tensors as views; for every size in ``--bucket-mb``; for the first size also with per-bucket
                  CRC-32 checksums (``bucketed+crc32@MB``) and with a fresh staging buffer per sync instead of the
                  kept one (``bucketed-fresh@MB``), and with two bucket buffers in flight whose contents are copied
                  into the staging buffer (``bucketed-bounded@MB``: the receive path of a GPU engine's host staging,
                  without the device→host copy).

Two more rows bound where the bucketed sync's extra time goes (neither is a sync: no tensor is delivered):

* ``chunked@MB``  the flat buffer broadcast in bucket-sized pieces, all posted at once: the per-operation cost alone;
* ``flat+copy``   the flat broadcast while the sender, independently, copies every tensor into a second buffer of
                  the model's size: the packing work with perfect overlap (no bucket waits for its packing).

Each timing is rank 0's wall time from the start of a trial to a barrier that every receiver enters after it has
its tensors (median of ``--repeats``). Every process also records the CPU time (user + system) it spent in each
trial: on a machine with few cores the sync is bounded by the CPU all processes need together, and the table's
``CPU/wall`` column shows how many cores each method kept busy. Prints a table and writes JSON (``--out``).

    python tools/bench_weight_sync.py --receivers 2 --out bench_weight_sync.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import resource
import secrets
import statistics
import sys
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from oapl_megatron.weight_sync.bucket import TensorMeta, _copy_bytes, dtype_from_name, plan_buckets  # noqa: E402
from oapl_megatron.weight_sync.sync import SyncMeta, receive_weights, send_weights  # noqa: E402
from oapl_megatron.weight_sync.transport import (WeightGroup, make_receiver, make_sender,  # noqa: E402
                                                 open_rendezvous)


def synthetic_metas(layers: int, hidden: int, ffn: int, vocab: int, dtype: str) -> list[TensorMeta]:
    """HF-Qwen3-like names and shapes (untied head): 11 tensors per layer + embedding, final norm, head."""
    m = [TensorMeta("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        m += [TensorMeta(f"{p}.input_layernorm.weight", dtype, (hidden,)),
              TensorMeta(f"{p}.self_attn.q_proj.weight", dtype, (hidden, hidden)),
              TensorMeta(f"{p}.self_attn.k_proj.weight", dtype, (hidden, hidden)),
              TensorMeta(f"{p}.self_attn.v_proj.weight", dtype, (hidden, hidden)),
              TensorMeta(f"{p}.self_attn.o_proj.weight", dtype, (hidden, hidden)),
              TensorMeta(f"{p}.self_attn.q_norm.weight", dtype, (hidden // 8,)),
              TensorMeta(f"{p}.self_attn.k_norm.weight", dtype, (hidden // 8,)),
              TensorMeta(f"{p}.post_attention_layernorm.weight", dtype, (hidden,)),
              TensorMeta(f"{p}.mlp.gate_proj.weight", dtype, (ffn, hidden)),
              TensorMeta(f"{p}.mlp.up_proj.weight", dtype, (ffn, hidden)),
              TensorMeta(f"{p}.mlp.down_proj.weight", dtype, (hidden, ffn))]
    m += [TensorMeta("model.norm.weight", dtype, (hidden,)), TensorMeta("lm_head.weight", dtype, (vocab, hidden))]
    return m


def schedule(methods: list[str], repeats: int) -> list[str]:
    # one warm-up of each method first (connection set-up, first-touch allocation), not timed
    return [f"warmup:{m}" for m in methods] + [m for _ in range(repeats) for m in methods]


LABELS = {
    "flat": "one flat gloo broadcast of all bytes (the limit)",
    "per_tensor": "one gloo broadcast per tensor, each waited",
    "per_tensor_pipelined": "one gloo broadcast per tensor, all posted at once",
    "per_tensor_rpc": "one RPC per tensor (pickled over the control plane, acked)",
    "bucketed": "bucketed sync (send_weights/receive_weights)",
    "bucketed-fresh": "bucketed sync, fresh staging buffer per sync",
    "bucketed-bounded": "bucketed sync, 2 bucket buffers in flight, copied into staging (GPU host staging)",
    "bucketed+crc32": "bucketed sync with per-bucket CRC-32",
    "chunked": "bound: the flat buffer in bucket-sized broadcasts, all posted at once (no packing)",
    "flat+copy": "bound: one flat broadcast while the sender copies every tensor (packing with perfect overlap)",
}


def label(method: str) -> str:
    kind, _, mb = method.partition("@")
    return LABELS[kind] + (f", {mb} MiB buckets" if mb else "")


def run_trial(group, rank: int, method: str, metas, tensors, flat: torch.Tensor, bucket_bytes: int, rpc=None):
    """One trial of ``method`` on this rank. Rank 0 sends, others receive; every rank ends in a barrier.

    ``rpc``: on rank 0 the control-plane connections to every receiver, on a receiver its connection to rank 0.
    """
    kind = method.split(":")[-1]
    if kind == "flat":
        w = group.pg.broadcast([flat], _opts())
        w.wait()
    elif kind == "flat+copy":
        w = group.pg.broadcast([flat], _opts())
        if rank == 0:  # the packing work, not tied to the wire: every tensor copied once into a model-sized buffer
            scratch = _SCRATCH.setdefault("copy", torch.empty_like(flat))
            pos = 0
            for t in tensors:
                n = t.numel() * t.element_size()
                _copy_bytes(scratch[pos:pos + n], t.reshape(-1).view(torch.uint8))
                pos += n
        w.wait()
    elif kind.startswith("chunked@"):
        step = int(kind.partition("@")[2]) * 2**20
        works = [group.pg.broadcast([flat[o:o + step]], _opts()) for o in range(0, flat.numel(), step)]
        for w in works:
            w.wait()
    elif kind == "per_tensor":  # what per-tensor designs do: announce, move, load one tensor at a time
        for t in tensors:
            group.pg.broadcast([t], _opts()).wait()
    elif kind == "per_tensor_pipelined":  # best case for per-tensor: every broadcast posted at once
        works = [group.pg.broadcast([t], _opts()) for t in tensors]
        for w in works:
            w.wait()
    elif kind == "per_tensor_rpc":  # one control-plane message per tensor, loaded on arrival, acked
        if rank == 0:
            for m, t in zip(metas, tensors):
                msg = pickle.dumps((m.name, t), protocol=pickle.HIGHEST_PROTOCOL)  # by value, once per tensor
                for conn in rpc:  # the same RPC to every receiver, as a collective RPC issues it
                    conn.send_bytes(msg)
                for conn in rpc:
                    if conn.recv_bytes() != b"ok":
                        raise RuntimeError(f"per_tensor_rpc: bad ack for {m.name}")
        else:
            for m, dst in zip(metas, tensors):
                name, t = pickle.loads(rpc.recv_bytes())
                if name != m.name:
                    raise RuntimeError(f"per_tensor_rpc: got {name}, expected {m.name}")
                dst.copy_(t)
                rpc.send_bytes(b"ok")
    else:
        kind, _, mb = kind.partition("@")
        bucket_bytes = int(mb) * 2**20
        algo = "crc32" if kind == "bucketed+crc32" else None
        meta = SyncMeta(version=1, metas=tuple(m.to_wire() for m in metas), bucket_bytes=bucket_bytes,
                        checksum_algo=algo)
        if rank == 0:
            # one sender per group, as in the trainer: its pack buffers are reused across syncs
            sender = _SENDERS.setdefault(id(group), make_sender(group))
            send_weights(sender, meta.plan(), zip([m.name for m in metas], tensors), algo)
        else:
            keep = kind != "bucketed-fresh"  # fresh: a new staging buffer (page faults) on every sync
            receiver = _RECEIVERS.setdefault((id(group), keep), make_receiver(group, keep_staging=keep))
            # bounded: 2 bucket buffers, each copied into the staging buffer (a GPU receiver's host staging)
            staged, _ = receive_weights(receiver, meta,
                                        buckets_in_flight=2 if kind == "bucketed-bounded" else None)
            del staged
    group.pg.barrier().wait()


_SENDERS: dict = {}
_RECEIVERS: dict = {}
_SCRATCH: dict = {}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process (gloo's included)
    return r.ru_utime + r.ru_stime


def timed_trials(group, rank, methods, repeats, metas, tensors, flat, bucket_bytes, rpc):
    """Run the schedule; returns per method the wall times and this process's CPU times (s) of each trial."""
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for method in schedule(methods, repeats):
        c0, t0 = _cpu_s(), time.perf_counter()
        run_trial(group, rank, method, metas, tensors, flat, bucket_bytes, rpc)
        if not method.startswith("warmup:"):
            wall[method].append(time.perf_counter() - t0)
            cpu[method].append(_cpu_s() - c0)
    return wall, cpu


def _opts():
    import torch.distributed as dist

    o = dist.BroadcastOptions()
    o.rootRank, o.rootTensor = 0, 0
    return o


def receiver_main(port, rank, world, metas, methods, repeats, bucket_bytes, timeout_s, rpc_address, authkey):
    torch.set_num_threads(1)
    rpc = Client(rpc_address, authkey=authkey)  # before the group join: rank 0 accepts before it joins
    rpc.send(rank)
    group = WeightGroup.join("127.0.0.1", port, rank, world, "gloo", timeout_s)
    total = sum(m.nbytes for m in metas)
    flat = torch.empty(total, dtype=torch.uint8)
    tensors = [torch.empty(m.shape, dtype=dtype_from_name(m.dtype)) for m in metas]
    _, cpu = timed_trials(group, rank, methods, repeats, metas, tensors, flat, bucket_bytes, rpc)
    group.close()
    rpc.send(cpu)
    rpc.close()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--bucket-mb", default="8,64", help="comma-separated bucket sizes (MiB) to time")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    metas = synthetic_metas(args.layers, args.hidden, args.ffn, args.vocab, args.dtype)
    n_params = sum(m.numel for m in metas)
    total = sum(m.nbytes for m in metas)
    sizes = [int(x) for x in args.bucket_mb.split(",")]
    bucket_bytes = sizes[0] * 2**20
    methods = (["flat", "per_tensor", "per_tensor_pipelined", "per_tensor_rpc"] + [f"bucketed@{mb}" for mb in sizes]
               + [f"bucketed-fresh@{sizes[0]}", f"bucketed-bounded@{sizes[0]}", f"bucketed+crc32@{sizes[0]}",
                  f"chunked@{sizes[0]}", "flat+copy"])
    world = 1 + args.receivers
    store = open_rendezvous("127.0.0.1", 0, world, args.timeout_s)
    # control plane for per_tensor_rpc: authenticated multiprocessing.connection links, one per receiver
    authkey = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), backlog=world, authkey=authkey)
    listener._listener._socket.settimeout(args.timeout_s)  # a receiver that dies before connecting: no hang
    # fork before the sender allocates its tensors: the receivers do not need the data
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=receiver_main, args=(store.port, r, world, metas, methods, args.repeats,
                                                     bucket_bytes, args.timeout_s, listener.address, authkey))
             for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        rpc_by_rank = {}
        for _ in range(args.receivers):
            conn = listener.accept()
            rpc_by_rank[conn.recv()] = conn
        rpc = [rpc_by_rank[r] for r in range(1, world)]
        g = torch.Generator().manual_seed(0)
        tensors = [torch.randn(m.shape, generator=g, dtype=torch.float32).to(dtype_from_name(m.dtype))
                   for m in metas]
        flat = torch.empty(total, dtype=torch.uint8)
        group = WeightGroup.join("127.0.0.1", store.port, 0, world, "gloo", args.timeout_s, store=store)
        times, cpu0 = timed_trials(group, 0, methods, args.repeats, metas, tensors, flat, bucket_bytes, rpc)
        group.close()
        cpus = [cpu0]
        for conn in rpc:
            if not conn.poll(args.timeout_s):
                raise RuntimeError(f"a receiver sent no CPU times within {args.timeout_s:.0f}s")
            cpus.append(conn.recv())
            conn.close()
    finally:
        listener.close()
        for p in procs:
            p.join(timeout=args.timeout_s)
            if p.is_alive():
                p.kill()
    med = {m: statistics.median(v) for m, v in times.items()}
    # CPU seconds of every process together, per trial (median); divided by the wall time: cores kept busy
    cpu_total = {m: statistics.median([sum(c[m][i] for c in cpus) for i in range(len(times[m]))]) for m in methods}
    cpu_sender = {m: statistics.median(cpu0[m]) for m in methods}
    best_t = {m: min(v) for m, v in times.items()}  # on a shared, noisy machine the best run is the cleanest
    best = min((m for m in methods if m.startswith("bucketed@")), key=lambda m: med[m])
    crc = f"bucketed+crc32@{sizes[0]}"
    result = {
        "model": {"params": n_params, "tensors": len(metas), "dtype": args.dtype, "bytes": total},
        "receivers": args.receivers, "bucket_mb": sizes,
        "n_buckets": {mb: len(plan_buckets(metas, mb * 2**20).buckets) for mb in sizes}, "repeats": args.repeats,
        "backend": "gloo (loopback)", "host": platform.node(), "cpus": os.cpu_count(),
        "load_avg_1m_at_end": os.getloadavg()[0],
        "times_s": times, "median_s": med, "min_s": best_t,
        "cpu_s_all_processes_median": cpu_total, "cpu_s_sender_median": cpu_sender,
        "cores_busy": {m: cpu_total[m] / med[m] for m in methods},
        "gb_per_s_median": {m: total / t / 1e9 for m, t in med.items()},
        "best_bucketed": best,
        # fraction of the flat limit's throughput (1.0 = as fast as one flat broadcast)
        "bucketed_vs_flat": {"median": med["flat"] / med[best], "min": best_t["flat"] / best_t[best]},
        "bucketed_crc_vs_flat": {"median": med["flat"] / med[crc], "min": best_t["flat"] / best_t[crc]},
        # how many times longer one broadcast per tensor takes than the bucketed sync
        "per_tensor_over_bucketed": {"median": med["per_tensor"] / med[best],
                                     "min": best_t["per_tensor"] / best_t[best]},
        "per_tensor_pipelined_over_bucketed": {"median": med["per_tensor_pipelined"] / med[best],
                                               "min": best_t["per_tensor_pipelined"] / best_t[best]},
        "per_tensor_rpc_over_bucketed": {"median": med["per_tensor_rpc"] / med[best],
                                         "min": best_t["per_tensor_rpc"] / best_t[best]},
        "labels": {m: label(m) for m in methods},
    }
    print(f"model: {n_params / 1e6:.1f}M params, {len(metas)} tensors, {args.dtype}, {total / 2**20:.0f} MiB; "
          f"{args.receivers} receivers; gloo loopback; buckets (MiB: count) {result['n_buckets']}; "
          f"load avg {result['load_avg_1m_at_end']:.1f} on {os.cpu_count()} CPUs")
    print(f"{'method':<22}{'median s':>10}{'min s':>8}{'GB/s':>7}{'vs flat':>9}{'CPU s':>7}{'CPU/wall':>9}"
          f"   all runs (s)")
    for m in methods:
        print(f"{m:<22}{med[m]:>10.3f}{best_t[m]:>8.3f}{result['gb_per_s_median'][m]:>7.2f}"
              f"{med['flat'] / med[m]:>9.2f}{cpu_total[m]:>7.3f}{cpu_total[m] / med[m]:>9.2f}   "
              + " ".join(f"{t:.3f}" for t in times[m]))
    r, q = result["bucketed_vs_flat"], result["per_tensor_over_bucketed"]
    print(f"{best}: {r['median']:.2f}x (median) / {r['min']:.2f}x (best run) of the flat limit (goal ≥ 0.8); "
          f"per-tensor takes {q['median']:.2f}x / {q['min']:.2f}x the bucketed time (goal ≥ 10)")
    q = result["per_tensor_rpc_over_bucketed"]
    print(f"per_tensor_rpc ({label('per_tensor_rpc')}) takes {q['median']:.2f}x (median) / {q['min']:.2f}x "
          f"(best run) the bucketed time")
    print("methods: " + "; ".join(f"{m} = {label(m)}" for m in methods))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
