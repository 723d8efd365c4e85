"""``oapl-launch`` — start a run on one node (torchrun) or on a Slurm cluster (one heterogeneous job).

    oapl-launch local CONFIG [dotted.overrides] [--resume] [--nproc N]
    oapl-launch slurm CONFIG [dotted.overrides] --trainer-nodes N --engine-nodes M [--gpus-per-node K]
                      [--partition P] [--time HH:MM:SS] [--container-image IMG] [--dry-run]
    oapl-launch layout CONFIG [dotted.overrides]          # print the placement and stop

``slurm`` renders ``launch/templates/slurm_hetjob.sh`` with the resolved config embedded and submits it with
``sbatch`` (``--dry-run`` prints it instead; keep and edit it). Flags are shorthands for ``launch.*`` overrides.
Nothing heavy (torch, vLLM) is imported here.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="oapl-launch", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("local", "one node: torchrun + local engines, torn down together"),
                        ("slurm", "a heterogeneous Slurm job: trainer nodes + engine nodes"),
                        ("layout", "print the device placement of a config")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
        if name == "local":
            p.add_argument("--nproc", type=int, default=None, help="trainer ranks (default: from the config)")
            p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        if name in ("slurm", "layout"):
            p.add_argument("--trainer-nodes", type=int, help="launch.trainer_nodes")
            p.add_argument("--engine-nodes", type=int, help="launch.engine_nodes")
            p.add_argument("--gpus-per-node", type=int, help="launch.gpus_per_node (0 = CPU nodes)")
        if name == "slurm":
            p.add_argument("--partition", help="launch.slurm.partition")
            p.add_argument("--account", help="launch.slurm.account")
            p.add_argument("--time", help="launch.slurm.time_limit, [D-]HH:MM:SS")
            p.add_argument("--container-image", help="launch.container.image (pyxis; see launch.container.runtime)")
            p.add_argument("--dry-run", action="store_true", help="print the batch script, do not submit")
    return ap


_FLAG_FIELDS = {"trainer_nodes": "launch.trainer_nodes", "engine_nodes": "launch.engine_nodes",
                "gpus_per_node": "launch.gpus_per_node", "partition": "launch.slurm.partition",
                "account": "launch.slurm.account", "time": "launch.slurm.time_limit",
                "container_image": "launch.container.image"}


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args, extra = ap.parse_known_args(argv)
    # dotted overrides may also follow the flags (argparse stops the positional list at the first flag)
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = list(args.overrides) + extra
    from oapl_megatron.config.loader import ConfigError, load_config
    from oapl_megatron.config.schema import RunConfig

    overrides = list(args.overrides)
    for attr, field in _FLAG_FIELDS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{field}={value}")
    try:
        cfg = load_config(RunConfig, args.config, overrides)
        if args.cmd == "local":
            return _local(cfg, args)
        if args.cmd == "layout":
            from oapl_megatron.launch.placement import place_cluster

            print(place_cluster(cfg).describe())
            return 0
        return _slurm(cfg, args, argv if argv is not None else sys.argv[1:])
    except ConfigError as e:
        print(f"oapl-launch: {e}", file=sys.stderr)
        return 2


def _local(cfg, args) -> int:
    from oapl_megatron.launch.local import local_gpu_count, run_job, torchrun_command
    from oapl_megatron.launch.placement import check_trainer_grid, place_node

    gpus = local_gpu_count()
    nproc = args.nproc or cfg.launch.trainer_ranks_per_node or _default_ranks(cfg, gpus)
    check_trainer_grid(nproc, 1, cfg.parallel.tp, cfg.parallel.pp, gpus, ranks_field="--nproc")
    if cfg.rollout.mode == "local":
        print("[oapl-launch] " + place_node(gpus, nproc, cfg.rollout.engines, cfg.rollout.engine_tp,
                                            cfg.rollout.devices, ranks_field="--nproc").describe(), flush=True)
    env = dict(os.environ)
    if not gpus:
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
    cmd = torchrun_command(args.config, list(args.overrides), nproc, args.resume)
    print("[oapl-launch] " + " ".join(cmd[2:]), flush=True)
    rc = run_job(cmd, env=env)
    if rc:
        print(f"[oapl-launch] the job failed (exit code {rc}); no process of it is left", file=sys.stderr)
    return rc


def _default_ranks(cfg, gpus: int) -> int:
    """CPU: one model replica (tp × pp). GPU: every GPU the engines leave (local engines) or every GPU."""
    if not gpus:
        return cfg.parallel.tp * cfg.parallel.pp
    ro = cfg.rollout
    if ro.mode != "local":
        return gpus
    return min(ro.devices) if ro.devices else max(1, gpus - ro.engines * ro.engine_tp)


def _slurm(cfg, args, argv: list[str]) -> int:
    import shlex

    from oapl_megatron.launch.slurm import log_root, render, submit

    header = "rendered by: oapl-launch " + " ".join(shlex.quote(a) for a in argv)
    script = render(cfg, header=header)
    if args.dry_run:
        print(script)
        return 0
    job = submit(script, cfg)
    print(f"[oapl-launch] submitted job {job}; logs: {log_root(cfg)}/attempt-N/ (batch.log, trainer-*.log, "
          f"engine-*.log); script: {log_root(cfg)}/job.sbatch", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
