"""Benchmark the per-token log-prob + entropy computation (forward and backward) on the trainer's last stage:
the chunked pass of :mod:`oapl_megatron.trainer.logprobs` against the full-vocabulary formula it replaced
(cast to fp32, padding mask, clone, megatron's vocab-parallel cross entropy, entropy from shifted/exp/product
tensors). Each (method, size) runs in a fresh subprocess and reports its peak resident memory above the inputs
(``ru_maxrss`` minus the RSS after the logits and targets exist) and its wall time; the chunked results are
checked against the full formula. On a GPU machine, ``tools/gpu_smoke.py``'s ``logprobs_memory`` check measures
the same on CUDA. Prints a table and writes JSON::

    python tools/bench_logprobs.py --tokens 512,2048 --vocab 151936 --out bench_logprobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def full_vocab_formula(logits, targets, vocab: int):
    """The formula the chunked pass replaced (TP=1): fp32 cast, padding mask, clone, megatron's vocab-parallel
    cross entropy (differentiable log-probs), entropy from shifted / exp / product tensors. Needs megatron's
    model-parallel state (a world of one). Also used by tools/gpu_smoke.py's logprobs_memory check."""
    import torch
    from megatron.core import tensor_parallel

    from oapl_megatron.trainer.logprobs import mask_vocab_padding

    z = mask_vocab_padding(logits.float(), vocab, 0)
    lp = -tensor_parallel.vocab_parallel_cross_entropy(z.clone(), targets)
    with torch.no_grad():
        zz = z - z.max(-1, keepdim=True).values
        ez = zz.exp()
        ent = ez.sum(-1).log() - (ez * zz).sum(-1) / ez.sum(-1)
    return lp, ent


def _child(method: str, tokens: int, vocab: int, dtype: str) -> dict:
    import torch

    from oapl_megatron.config.schema import ParallelConfig
    from oapl_megatron.parallel.bootstrap import init_distributed, shutdown
    from oapl_megatron.trainer.logprobs import token_logprobs_and_entropy

    init_distributed(ParallelConfig(), seed=0)
    g = torch.Generator().manual_seed(0)
    # made in its own dtype (an fp32 temporary would set the process's peak RSS before the measurement starts)
    logits = torch.randn(1, tokens, vocab, generator=g, dtype=getattr(torch, dtype)).mul_(4).requires_grad_(True)
    targets = torch.randint(0, vocab, (1, tokens), generator=g)
    base = _rss_bytes()
    t0 = time.perf_counter()
    if method == "chunked":
        lp, ent = token_logprobs_and_entropy(logits, targets, vocab, 0, None)
    else:
        lp, ent = full_vocab_formula(logits, targets, vocab)
    lp.sum().backward()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"method": method, "tokens": tokens, "vocab": vocab, "dtype": dtype, "wall_s": wall,
           "peak_above_inputs_gib": (peak - base) / 2**30,
           "logits_gib": logits.numel() * logits.element_size() / 2**30,
           "logp": lp.detach().reshape(-1)[:64].tolist(), "entropy": ent.detach().reshape(-1)[:64].tolist()}
    shutdown()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="512,2048", help="comma-separated token counts")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--out", default="bench_logprobs.json")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "TOKENS", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), int(args.child[2]), args.dtype)))
        return 0
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        pair = {}
        for method in ("chunked", "full"):
            proc = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--child", method, str(tokens),
                                   str(args.vocab)], env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"{method} at {tokens} tokens failed:\n{proc.stderr[-3000:]}")
            pair[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        diff_lp = max(abs(a - b) for a, b in zip(pair["chunked"]["logp"], pair["full"]["logp"]))
        diff_h = max(abs(a - b) for a, b in zip(pair["chunked"]["entropy"], pair["full"]["entropy"]))
        for method, r in pair.items():
            r.pop("logp"), r.pop("entropy")
            r.update(max_abs_diff_logp=diff_lp, max_abs_diff_entropy=diff_h)
            rows.append(r)
    print(f"{'method':<8} {'tokens':>7} {'vocab':>7} {'logits GiB':>10} {'peak GiB':>9} {'wall s':>7}")
    for r in rows:
        print(f"{r['method']:<8} {r['tokens']:>7} {r['vocab']:>7} {r['logits_gib']:>10.2f} "
              f"{r['peak_above_inputs_gib']:>9.2f} {r['wall_s']:>7.2f}")
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "command": " ".join([sys.executable, *sys.argv]), "dtype": args.dtype, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}; chunked vs full: max |Δ logp| {rows[0]['max_abs_diff_logp']:.2e}, "
          f"max |Δ entropy| {rows[0]['max_abs_diff_entropy']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
