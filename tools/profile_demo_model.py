"""Build the CPU demo's policy for profiling runs: the demo's tiny Qwen3 and char tokenizer with a shorter warm
start (150 steps instead of 400: the timing of a loop step depends on the shapes and the response lengths, and a
150-step policy already answers in the demo's format).

    python tools/profile_demo_model.py runs/profile_demo_model [--steps 150]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from oapl_megatron.config.loader import load_config
from oapl_megatron.config.schema import RunConfig
from oapl_megatron.entrypoints import demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    cfg = load_config(RunConfig, demo.REPO / "configs" / "demo.yaml", [])
    demo.WARM = {**demo.WARM, "steps": args.steps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo.build_warm_start(cfg, out, log=lambda s: print("[profile_demo_model] " + s, flush=True))


if __name__ == "__main__":
    main()
