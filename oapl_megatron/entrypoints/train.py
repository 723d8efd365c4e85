"""``oapl-train CONFIG [dotted.key=value ...]`` — run OAPL (or a GRPO baseline) on a Megatron-core trainer.

Launch under torchrun for several trainer ranks, e.g. ``torchrun --nproc-per-node 2 -m
oapl_megatron.entrypoints.train configs/demo.yaml parallel.tp=2``. ``--help-config`` lists every field.
Heavy modules (torch, megatron, vLLM) are imported only after the config is valid.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="oapl-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6 loop.lag=50")
    ap.add_argument("--help-config", action="store_true", help="list every config field with its default")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest complete checkpoint of the run (also with another DP size)")
    args = ap.parse_args(argv)

    from oapl_megatron import console

    console.install()  # before megatron-core is imported: it warns at import time
    from oapl_megatron.config.loader import ConfigError, describe_fields, load_config
    from oapl_megatron.config.schema import RunConfig

    if args.help_config:
        print("\n".join(describe_fields(RunConfig)))
        return 0
    try:
        overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
        cfg = load_config(RunConfig, args.config, overrides)
    except ConfigError as e:
        print(f"oapl-train: {e}", file=sys.stderr)
        return 2

    console.set_run_dir(cfg.run_dir)
    from oapl_megatron.orchestrator.loop import run

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
