"""The demo's warm-started model for launch tests: reused from ``make demo`` or built once by the demo's own code."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A short run on the demo's model: 4 prompts × 4 samples per step, L = 2, no evaluation, no export.
SHORT = ["train.prompts_per_step=4", "train.samples_per_prompt=4", "train.micro_batch_size=8", "loop.lag=2",
         "loop.buffer_groups=8", "loop.generate_prompts=4", "rollout.max_tokens=40", "eval.every=0",
         "optim.scheduler.warmup_steps=1", "export.final_hf=false", "logging.progress=false"]


def demo_model() -> Path:
    """``runs/demo/warmstart`` if its fingerprint matches configs/demo.yaml, else ``runs/test_cache/demo_warmstart``
    (built on first use, ≈ 100 s on 2 cores)."""
    from oapl_megatron.config.loader import load_config
    from oapl_megatron.config.schema import RunConfig
    from oapl_megatron.entrypoints.demo import _reusable, build_warm_start

    cfg = load_config(RunConfig, REPO / "configs" / "demo.yaml")
    for cand in (REPO / "runs" / "demo" / "warmstart", REPO / "runs" / "test_cache" / "demo_warmstart"):
        if _reusable(cand, cfg):
            return cand
    build_warm_start(cfg, cand, log=lambda s: None)
    return cand
