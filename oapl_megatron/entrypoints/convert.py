"""``oapl-convert``: convert checkpoints between Hugging Face safetensors and Megatron dist_checkpointing.

    oapl-convert hf-to-mcore --hf /models/Qwen3-0.6B --out ckpt/qwen3 --tp 2 --pp 2
    oapl-convert mcore-to-hf --ckpt ckpt/qwen3 --out out/qwen3-hf --dtype bf16
    oapl-convert mcore-to-hf --run-dir runs/demo --out out/demo-hf       # newest complete trainer checkpoint
    oapl-convert reshard     --ckpt ckpt/qwen3 --out ckpt/qwen3-tp1 --tp 1 --pp 1

Parsing only here (``--help`` imports neither torch nor megatron); the work is in
:mod:`oapl_megatron.models.convert`, which documents the memory design; the checkpoint layout, one for the trainer
and the converter, is :mod:`oapl_megatron.trainer.checkpoint.layout` (a trainer checkpoint converts as it is).
Exit status 2 with a one-line message for bad input (unsupported architecture, missing or truncated file,
shape mismatch); 1 for anything unexpected (with the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oapl-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    h2m = sub.add_parser("hf-to-mcore", help="HF directory → Megatron checkpoint (written at --tp/--pp)")
    h2m.add_argument("--hf", required=True, help="HF directory: config.json, *.safetensors, tokenizer files")
    h2m.add_argument("--out", required=True, help="new (or empty) output directory")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write with (any size loads it)")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to write with")
    h2m.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                     help="checkpoint dtype; auto = bf16 when the HF config says bfloat16, else fp32")

    m2h = sub.add_parser("mcore-to-hf", help="Megatron checkpoint → HF directory (transformers / vLLM load it)")
    src = m2h.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint directory: a trainer's run/checkpoints/step_* or hf-to-mcore output")
    src.add_argument("--run-dir", help="training run directory: convert its newest complete checkpoint")
    m2h.add_argument("--out", required=True, help="new (or empty) output directory")
    m2h.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                     help="output dtype; default: the dtype of the original HF config")
    m2h.add_argument("--workers", type=int, default=1,
                     help="pipeline stages (processes) that read the checkpoint; per-process memory ≈ model/workers")
    m2h.add_argument("--max-shard-size", default="2GB", help="largest output safetensors file, e.g. 2GB, 500MB")

    rs = sub.add_parser("reshard", help="rewrite a Megatron checkpoint at another --tp/--pp")
    rs.add_argument("--ckpt", required=True, help="source checkpoint directory (trainer or hf-to-mcore)")
    rs.add_argument("--out", required=True, help="new (or empty) output directory")
    rs.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    rs.add_argument("--pp", type=int, required=True, help="target pipeline-parallel size")

    for s in (h2m, m2h, rs):
        s.add_argument("--timeout", type=float, default=1800.0, help="seconds any rank waits on another")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from oapl_megatron.config.loader import ConfigError
    from oapl_megatron.models import convert as C  # heavy imports happen inside the functions
    from oapl_megatron.models.hf_config import UnsupportedArchitectureError
    from oapl_megatron.models.hf_io import CheckpointFileError
    from oapl_megatron.models.mapping import MappingError
    from oapl_megatron.trainer.checkpoint.layout import CheckpointError

    start = time.time()
    try:
        if args.cmd == "hf-to-mcore":
            side = C.hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, timeout_s=args.timeout)
            what = f"{side['arch']['family']} checkpoint at tp={args.tp} pp={args.pp} ({side['dtype']})"
        elif args.cmd == "mcore-to-hf":
            ckpt = args.ckpt or C.run_checkpoint(args.run_dir)
            if args.run_dir:
                print(f"oapl-convert mcore-to-hf: converting {ckpt}", flush=True)
            files = C.mcore_to_hf(ckpt, args.out, dtype=args.dtype, workers=args.workers,
                                  max_shard_size=args.max_shard_size, timeout_s=args.timeout)
            what = f"{len(files)} safetensors file(s)"
        else:
            C.reshard(args.ckpt, args.out, tp=args.tp, pp=args.pp, timeout_s=args.timeout)
            what = f"checkpoint resharded to tp={args.tp} pp={args.pp}"
    except (C.ConvertError, CheckpointError, ConfigError, UnsupportedArchitectureError, CheckpointFileError,
            MappingError, FileNotFoundError) as exc:
        print(f"oapl-convert {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    print(f"oapl-convert {args.cmd}: wrote {what} to {args.out} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
