"""``oapl-profile``: where a run's time goes, MFU, layout sweeps, scaling tables and the cost model.

    oapl-profile run RUN_DIR [--peak-tflops X | --peak-json peak/result.json]   # breakdown table + PNG + JSON
    oapl-profile peak --ranks 2 --out prof/peak                                  # GEMM peak, all-reduce/broadcast
    oapl-profile sweep --model cpu-small --ranks 4 --mbs 2 8 --out prof/sweep     # layouts on the real trainer
    oapl-profile scaling --model cpu-small --ranks 1 2 4 --out prof/scaling       # weak/strong trainer scaling
    oapl-profile scaling --loop configs/demo.yaml --ranks 1 2 4 --out prof/loop   # the whole loop per world size
    oapl-profile model --model qwen3-4b --gpu h100 --gpus 8 64 1024 --lag 50      # the cost model
    oapl-profile validate --trainer prof/scaling/scaling.json --loop prof/loop/scaling.json   # predicted vs measured

Every subcommand prints a table and writes JSON (``--out``); plots are made from the JSON.
(The module is ``profiling``, not ``profile``: the entrypoints run as scripts put this directory first on
``sys.path``, where a ``profile.py`` would shadow the standard library's ``profile`` that cProfile imports.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _peak_from(args) -> float | None:
    if getattr(args, "peak_tflops", None):
        return args.peak_tflops * 1e12
    if getattr(args, "peak_json", None):
        return float(json.loads(Path(args.peak_json).read_text())["peak_flops_per_rank"])
    return None


def cmd_run(args) -> None:
    from oapl_megatron.profile.breakdown import analyze_run

    res = analyze_run(Path(args.run_dir), _peak_from(args), Path(args.out) if args.out else None, png=not args.no_png)
    print(res["table"])


def cmd_peak(args) -> None:
    from oapl_megatron.profile.launch import run_workers
    from oapl_megatron.profile.peak import format_peak

    extra = ["--min-time-s", str(args.min_time_s)]
    if args.gemm_sizes:
        extra += ["--gemm-sizes", *map(str, args.gemm_sizes)]
    r = run_workers("oapl_megatron.profile.peak", args.ranks, Path(args.out), extra, args.timeout_s,
                    threads_per_rank=args.threads_per_rank)
    print(format_peak(r))


def cmd_sweep(args) -> None:
    from oapl_megatron.profile.launch import run_workers
    from oapl_megatron.profile.sweep import format_sweep, layouts_for

    layouts = args.layouts or layouts_for(args.ranks, args.mbs, vpp=not args.no_vpp)
    extra = ["--model", args.model, "--seqs", str(args.seqs), "--prompt-len",
             str(args.prompt_len), "--response-len", str(args.response_len), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--response-jitter", str(args.response_jitter)]
    peak = _peak_from(args)
    if peak:
        extra += ["--peak-flops", str(peak)]
    if not args.fresh_process:
        r = run_workers("oapl_megatron.profile.sweep", args.ranks, Path(args.out), ["--layouts", *layouts, *extra],
                        args.timeout_s)
    else:  # one torchrun per layout: CPU memory (resident set) then belongs to that layout alone
        r = None
        for layout in layouts:
            one = run_workers("oapl_megatron.profile.sweep", args.ranks, Path(args.out) / layout,
                              ["--layouts", layout, *extra], args.timeout_s)
            if r is None:
                r = one
            else:
                r["rows"] += one["rows"]
                r["errors"] += one["errors"]
        r["fresh_process"] = True
        (Path(args.out) / "result.json").write_text(json.dumps(r, indent=1))
    print(format_sweep(r))


def cmd_scaling(args) -> None:
    from oapl_megatron.profile import scaling

    out = Path(args.out)
    res: dict = {}
    if args.loop:
        res["loop"] = scaling.loop_scaling(args.loop, args.ranks, out, args.override, _peak_from(args),
                                           args.timeout_s)
    else:
        res["trainer"] = scaling.trainer_scaling(args.model, args.ranks, out, args.seqs_per_rank, args.prompt_len,
                                                 args.response_len, args.mbs, args.steps, args.warmup, args.family,
                                                 _peak_from(args), args.timeout_s, args.response_jitter,
                                                 tuple(args.kinds), args.strong_seqs)
    scaling.write(res, out)
    print(scaling.format_scaling(res))


def cmd_model(args) -> None:
    from oapl_megatron.profile import costmodel as cm
    from oapl_megatron.profile.presets import GPUS, arch

    gpu = GPUS[args.gpu]
    if args.peak_json:  # a measured peak replaces the data sheet's
        peak = float(json.loads(Path(args.peak_json).read_text())["peak_flops_per_rank"])
        gpu = dataclasses.replace(gpu, peak_flops={**gpu.peak_flops, args.dtype: peak})
    eff = cm.Efficiency(**json.loads(Path(args.efficiency).read_text())) if args.efficiency else cm.Efficiency()
    w = cm.Workload(arch(args.model), args.prompts, args.samples, args.prompt_len, args.response_len)
    rows = cm.scaling_curve(w, gpu, args.gpus, args.lag, eff, args.tp, args.pp, args.engine_tp)
    print(f"cost model: {args.model} ({w.arch.num_params / 1e9:.2f}B params) on {gpu.name}, L={args.lag}, "
          f"P={args.prompts}, G={args.samples}, prompt {args.prompt_len} + response {args.response_len} tokens, "
          f"trainer tp={args.tp} pp={args.pp}, engine tp={args.engine_tp}")
    print("assumptions: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(eff).items())
          + f"; peak {gpu.peak_flops[args.dtype] / 1e12:.0f} TFLOP/s {args.dtype}, HBM "
          f"{gpu.hbm_bytes_per_s / 1e12:.2f} TB/s, NVLink {gpu.nvlink_bytes_per_s / 1e9:.0f} GB/s, network "
          f"{gpu.net_bytes_per_s / 1e9:.0f} GB/s per GPU; best trainer/engine split per size")
    print(f"{'GPUs':>5} {'train':>5} {'eng':>5} {'train s':>8} {'gen s/step':>10} {'sync s':>7} {'sync/L':>7} "
          f"{'step s':>8} {'bound':>8} {'eng idle':>8} {'L for ≤10%':>10} {'tok/s/GPU':>9} {'MFU':>6} {'eff':>6}")
    for r in rows:
        lsat = r["lag_to_saturate_engines"]
        print(f"{r['gpus']:>5} {r['trainer_gpus']:>5} {r['engine_gpus']:>5} {r['train_s']:>8.2f} "
              f"{r['gen_s_per_step']:>10.2f} {r['sync_s']:>7.3f} {r['sync_per_step_s']:>7.4f} {r['step_s']:>8.2f} "
              f"{r['bound']:>8} {r['engine_idle_fraction']:>8.3f} {lsat if lsat else 'never':>10} "
              f"{r['tokens_per_s_per_gpu']:>9.0f} {100 * r['detail']['trainer']['achieved_mfu']:>5.1f}% "
              f"{100 * r['scaling_efficiency']:>5.1f}%")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "efficiency": dataclasses.asdict(eff),
                                              "gpu": dataclasses.asdict(gpu), "rows": rows}, indent=1, default=str))


def cmd_validate(args) -> None:
    from oapl_megatron.profile.validate import format_validation, validate

    res = validate([Path(p) for p in args.trainer], [Path(p) for p in args.loop], args.cores,
                   calibrate_on=args.calibrate_on)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(format_validation(res))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="oapl-profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def peak_opts(p):
        p.add_argument("--peak-tflops", type=float, help="per-rank peak TFLOP/s for MFU")
        p.add_argument("--peak-json", help="result.json of `oapl-profile peak` (its per-rank peak)")

    p = sub.add_parser("run", help="per-step breakdown of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--out", help="where breakdown.json/png go (default: the run directory)")
    p.add_argument("--no-png", action="store_true")
    peak_opts(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("peak", help="measured GEMM peak and collective bandwidths")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--threads-per-rank", type=int, default=None)
    p.add_argument("--gemm-sizes", type=int, nargs="+")
    p.add_argument("--min-time-s", type=float, default=0.3)
    p.add_argument("--out", default="runs/profile/peak")
    p.add_argument("--timeout-s", type=float, default=300)
    p.set_defaults(fn=cmd_peak)

    def batch_opts(p, seqs_name="--seqs", seqs_default=16):
        p.add_argument("--model", default="cpu-small", help="preset name or HF config path")
        p.add_argument(seqs_name, type=int, default=seqs_default)
        p.add_argument("--prompt-len", type=int, default=32)
        p.add_argument("--response-len", type=int, default=96)
        p.add_argument("--response-jitter", type=int, default=0, help="response lengths uniform in len ± this")
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--timeout-s", type=float, default=1800)
        peak_opts(p)

    p = sub.add_parser("sweep", help="trainer layouts (TP × PP × DP, VPP, micro-batch) of one world size")
    batch_opts(p)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--mbs", type=int, nargs="+", default=[2, 8])
    p.add_argument("--layouts", nargs="+", help="explicit layouts, e.g. tp2pp1mbs4 tp1pp2vpp2mbs2")
    p.add_argument("--no-vpp", action="store_true")
    p.add_argument("--fresh-process", action="store_true",
                   help="one torchrun per layout (CPU peak memory is then per layout; the resident set of a "
                        "process never shrinks, so in one process it is the running maximum)")
    p.add_argument("--out", default="runs/profile/sweep")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("scaling", help="weak/strong scaling of the trainer, or of the whole loop (--loop CONFIG)")
    batch_opts(p, "--seqs-per-rank", 8)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--family", choices=["dp", "tp", "pp"], default="dp")
    p.add_argument("--kinds", nargs="+", choices=["strong", "weak"], default=["strong", "weak"])
    p.add_argument("--strong-seqs", type=int, help="global batch of strong scaling (default per-rank × max ranks)")
    p.add_argument("--loop", help="an oapl-train config: scale the whole loop instead of the trainer")
    p.add_argument("--override", nargs="*", default=[], help="dotted overrides for --loop runs")
    p.add_argument("--out", default="runs/profile/scaling")
    p.set_defaults(fn=cmd_scaling)

    p = sub.add_parser("model", help="the cost model for a GPU cluster")
    p.add_argument("--model", default="qwen3-4b")
    p.add_argument("--gpu", choices=["h100", "h200"], default="h100")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--lag", type=int, default=50)
    p.add_argument("--prompts", type=int, default=32, help="P: prompts per optimizer step")
    p.add_argument("--samples", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--response-len", type=int, default=8192, help="mean generated tokens per sample")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--engine-tp", type=int, default=1)
    p.add_argument("--peak-json", help="use a measured peak (oapl-profile peak on the target GPU)")
    p.add_argument("--efficiency", help="JSON of Efficiency fields (a calibration) replacing the defaults")
    p.add_argument("--out", help="write the rows as JSON")
    p.set_defaults(fn=cmd_model)

    p = sub.add_parser("validate", help="cost model predicted vs measured loop step times on this machine")
    p.add_argument("--trainer", required=True, nargs="+",
                   help="scaling.json of `oapl-profile scaling` (trainer); several are merged (paired runs)")
    p.add_argument("--loop", required=True, nargs="+", help="scaling.json of `oapl-profile scaling --loop`; merged")
    p.add_argument("--cores", type=float, default=None, help="processors the loop shares (default: os.cpu_count())")
    p.add_argument("--calibrate-on", type=int, default=1,
                   help="loop world size whose engine rate and sync calibrate; 0 = each run's own (only the trainer "
                        "time is predicted)")
    p.add_argument("--out", default="runs/profile/validation.json")
    p.set_defaults(fn=cmd_validate)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"oapl-profile {args.cmd}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
