"""``oapl-profile sweep`` / ``scaling``: a few real trainer steps per layout, timed.

The worker (``python -m oapl_megatron.profile.sweep --out DIR --model M --layouts ...`` under torchrun, one
process per rank) builds the policy with megatron-core for each layout of the same world — TP × PP (× VPP), DP the
rest, a micro-batch size — runs ``--warmup`` untimed then ``--steps`` timed OAPL optimizer steps on a fixed
synthetic batch (random tokens, ``--seqs`` sequences of ``--prompt-len`` + ``--response-len`` tokens), and
records per layout: the median step time over the timed steps (each step as long as its slowest rank; split
into forward/backward and optimizer), trainer tokens/s, model FLOP/s and MFU
against ``--peak-flops`` (per rank), and the peak memory of every rank (GPU: max allocated; CPU: the largest
resident set sampled every 5 ms during the timed steps — a process's resident set never shrinks, so with several
layouts in one process it is a running maximum; ``oapl-profile sweep --fresh-process`` runs one per layout).
Weights are megatron's random initialisation: timing does not depend on the values. Writes ``DIR/result.json`` (rank 0).

A layout is written ``tp2pp1mbs4`` or ``tp1pp2vpp2mbs2``.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from pathlib import Path

_LAYOUT = re.compile(r"^tp(\d+)pp(\d+)(?:vpp(\d+))?mbs(\d+)$")


def parse_layout(text: str) -> dict:
    m = _LAYOUT.match(text)
    if not m:
        raise ValueError(f"layout {text!r}: expected e.g. tp2pp1mbs4 or tp1pp2vpp2mbs2")
    tp, pp, vpp, mbs = (int(g) if g else None for g in m.groups())
    return {"name": text, "tp": tp, "pp": pp, "vpp": vpp, "mbs": mbs}


def layouts_for(world: int, mbs: list[int], vpp: bool = True, max_pp: int = 4) -> list[str]:
    """Every TP × PP that divides ``world`` (PP ≤ max_pp), each micro-batch size, plus VPP=2 where PP ≥ 2."""
    out = []
    for tp in range(1, world + 1):
        for pp in range(1, min(world, max_pp) + 1):
            if world % (tp * pp):
                continue
            for m in mbs:
                out.append(f"tp{tp}pp{pp}mbs{m}")
                if vpp and pp >= 2:
                    out.append(f"tp{tp}pp{pp}vpp2mbs{m}")
    return out


class _RSSSampler:
    """Largest resident set size of this process while running (CPU memory has no allocator peak counter)."""

    def __init__(self, every_s: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._every = every_s
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=1.0)


def _records(vocab: int, seqs: int, prompt_len: int, response_len: int, seed: int, jitter: int = 0):
    import torch

    from oapl_megatron.trainer.batch import SequenceRecord

    g = torch.Generator().manual_seed(seed)
    recs = []
    for i in range(seqs):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        n = response_len + (int(torch.randint(-jitter, jitter + 1, (1,), generator=g)) if jitter else 0)
        resp = torch.randint(3, vocab, (max(1, n),), generator=g).tolist()
        recs.append(SequenceRecord(prompt, resp, advantage=float(i % 2) - 0.5, ref_logp=-2.0 * response_len))
    return recs


def run_layout(arch, layout: dict, records, steps: int, warmup: int, peak_flops: float | None) -> dict:
    import torch
    import torch.distributed as dist

    from oapl_megatron.config.schema import ModelConfig, OAPLObjective, OptimConfig
    from oapl_megatron.models.builder import build_policy
    from oapl_megatron.models.hf_config import make_vocab_padding
    from oapl_megatron.parallel.bootstrap import set_model_parallel
    from oapl_megatron.profile.flops import train_flops
    from oapl_megatron.trainer.batch import build_step_batch
    from oapl_megatron.trainer.optimizer import wrap_and_build_optimizer
    from oapl_megatron.trainer.step import apply_update, forward_backward

    ctx = set_model_parallel(layout["tp"], layout["pp"], layout["vpp"])
    cuda = torch.cuda.is_available()
    chunks = build_policy(arch, ModelConfig(), ctx)
    bf16 = next(chunks[0].parameters()).dtype == torch.bfloat16
    state = wrap_and_build_optimizer(chunks, OptimConfig(lr=1e-5), total_steps=steps + warmup + 1, bf16=bf16)
    padded = make_vocab_padding(arch.vocab_size, ctx.tp)
    batch = build_step_batch(records, dp_rank=ctx.dp_rank, dp_size=ctx.dp, micro_batch_size=layout["mbs"], pad_id=0)
    obj = OAPLObjective(beta1=1.0, beta2=0.1)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        apply_update(state, forward_backward(state, batch, obj, ctx, arch.vocab_size, padded))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    per_step = torch.zeros(steps, 3, dtype=torch.float64)  # [step, (total, fwd+bwd, optimizer)]
    with _RSSSampler() as rss:
        for i in range(steps):
            sync()
            t0 = time.perf_counter()
            m = forward_backward(state, batch, obj, ctx, arch.vocab_size, padded)
            sync()
            t1 = time.perf_counter()
            apply_update(state, m)
            sync()
            t2 = time.perf_counter()
            per_step[i] = torch.tensor([t2 - t0, t1 - t0, t2 - t1], dtype=torch.float64)
        dist.barrier()
    peak_mem = torch.cuda.max_memory_allocated() if cuda else rss.peak
    mems = [None] * dist.get_world_size()
    dist.all_gather_object(mems, peak_mem)
    # a step lasts as long as its slowest rank; the median over steps resists the bursts of a shared machine
    dist.all_reduce(per_step, op=dist.ReduceOp.MAX)
    med = per_step.median(dim=0).values.tolist()
    step_s, fb_s, opt_s = med
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in records)
    flops = train_flops(arch, [len(r.prompt_ids) + len(r.response_ids) for r in records])
    world = dist.get_world_size()
    out = {**layout, "dp": ctx.dp, "world_size": world, "step_s": step_s, "fwd_bwd_s": fb_s,
           "optimizer_s": opt_s, "step_s_all": per_step[:, 0].tolist(), "tokens_per_step": tokens,
           "tokens_per_s": tokens / step_s,
           "flops_per_step": flops, "flops_per_s": flops / step_s,
           "mfu": flops / step_s / (world * peak_flops) if peak_flops else None,
           "peak_mem_bytes_per_rank": mems, "mem_method": "cuda.max_memory_allocated" if cuda else "rss sampled 5 ms",
           "loss_last": m["loss"]}
    del state, chunks
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", required=True, help="preset name or HF config path")
    ap.add_argument("--layouts", nargs="+", required=True)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--response-len", type=int, default=96)
    ap.add_argument("--response-jitter", type=int, default=0,
                    help="response lengths uniform in response-len ± this (micro-batches pad to their longest)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak-flops", type=float, default=None, help="per-rank peak FLOP/s for the MFU")
    args = ap.parse_args(argv)

    import torch.distributed as dist

    from oapl_megatron.config.schema import ParallelConfig
    from oapl_megatron.parallel.bootstrap import init_distributed, shutdown
    from oapl_megatron.profile.presets import arch

    a = arch(args.model)
    ctx = init_distributed(ParallelConfig(tp=1, pp=1, timeout_s=600), seed=0)
    records = _records(a.vocab_size, args.seqs, args.prompt_len, args.response_len, seed=0,
                       jitter=args.response_jitter)
    rows, errors = [], []
    for text in args.layouts:
        layout = parse_layout(text)
        try:
            rows.append(run_layout(a, layout, records, args.steps, args.warmup, args.peak_flops))
        except Exception as e:  # a layout the model or world cannot take (e.g. heads % tp): report, go on
            if dist.is_initialized():
                dist.barrier()
            errors.append({"layout": text, "error": f"{type(e).__name__}: {e}"})
    if ctx.rank == 0:
        result = {"model": args.model, "num_params": a.num_params, "world_size": ctx.world_size,
                  "seqs": args.seqs, "prompt_len": args.prompt_len, "response_len": args.response_len,
                  "response_jitter": args.response_jitter,
                  "steps": args.steps, "warmup": args.warmup, "peak_flops_per_rank": args.peak_flops,
                  "rows": rows, "errors": errors}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1))
    shutdown()


def best(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None


def format_sweep(r: dict) -> str:
    lines = [f"model {r['model']} ({r['num_params'] / 1e6:.2f}M params), world {r['world_size']}, "
             f"{r['seqs']} seqs × ({r['prompt_len']}+{r['response_len']}) tokens, {r['steps']} timed steps",
             f"{'layout':>16} {'DP':>3} {'step s':>8} {'fwd+bwd s':>9} {'optim s':>8} {'tokens/s':>9} "
             f"{'GFLOP/s':>8} {'MFU %':>6} {'peak MB/rank':>13}"]
    for x in r["rows"]:
        mfu = f"{100 * x['mfu']:.1f}" if x["mfu"] is not None else "-"
        lines.append(f"{x['name']:>16} {x['dp']:>3} {x['step_s']:>8.3f} {x['fwd_bwd_s']:>9.3f} "
                     f"{x['optimizer_s']:>8.3f} {x['tokens_per_s']:>9.1f} {x['flops_per_s'] / 1e9:>8.3f} {mfu:>6} "
                     f"{max(x['peak_mem_bytes_per_rank']) / 2**20:>13.0f}")
    for e in r["errors"]:
        lines.append(f"{e['layout']:>16}  skipped: {e['error'][:100]}")
    b = best(r["rows"])
    if b:
        lines.append(f"best layout: {b['name']} ({b['tokens_per_s']:.1f} tokens/s)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
