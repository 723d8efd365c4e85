"""Worker for tests/test_checkpoint.py: trains a tiny policy, saves and resumes checkpoints, records what it saw.

Run under torchrun (several ranks) or as a plain process (a world of one) with one JSON argument::

    {"mode": "train", "tp": 1, "pp": 1, "steps": 4, "dropout": 0.1, "root": ".../ckpt", "save_at": [2],
     "keep_last": 2, "resume": null | "latest" | "<dir>", "record_at": [2], "out": "name",
     "pause": null | {"phase": "after_model_optim" | "before_commit", "step": 3, "signal": ".../paused"}}
    {"mode": "check_after_kill", "root": ".../ckpt", "out": "name"}

``train``: steps ``resume step .. steps-1`` of OAPL on batches that depend only on the step index (the data
cursor), saving at the listed step counts. Rank 0 writes ``$OAPL_TEST_OUT/{out}.pt`` with the per-step losses, the
full HF-named weights after the last step (and after load / at ``record_at`` steps), the ``extra`` dict returned
by the load, and every rank's Adam state (exp_avg, exp_avg_sq, step per parameter shard, gathered to rank 0).
With ``pause``, the save of that step stops at that phase (save_checkpoint's ``on_phase`` seam): rank 0 writes
the signal file, every rank that reaches the phase sleeps until the test SIGKILLs it. The tiny HF model is
written to ``{root}_hf`` (the checkpoint's ``hf_dir``).
``check_after_kill``: after a saver was SIGKILLed mid-save — find the latest checkpoint, load it, save the next
step, and try loading damaged copies (truncated, flipped byte, missing file, missing marker).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

# Only the standard library at module level: dist_checkpointing's first save starts a spawn-context Manager whose
# child re-imports this script as __mp_main__; without torch/megatron imports here it starts in a fraction of a
# second instead of ~4 s. Everything heavy is imported in _setup_imports(), called from main().


def _setup_imports() -> None:
    global torch, dist, make_model, oapl_advantages, ModelConfig, OAPLObjective, OptimConfig, ParallelConfig
    global build_policy, arch_from_hf, make_vocab_padding, iter_hf_weights, load_hf_weights, init_distributed
    global shutdown, SequenceRecord, build_step_batch, CheckpointError, latest_checkpoint, load_checkpoint
    global save_checkpoint, wrap_and_build_optimizer, train_step, OBJ
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from hf_tiny import make_model

    from oapl_megatron.algo import oapl_advantages
    from oapl_megatron.config.schema import ModelConfig, OAPLObjective, OptimConfig, ParallelConfig
    from oapl_megatron.models.builder import build_policy
    from oapl_megatron.models.hf_config import arch_from_hf, make_vocab_padding
    from oapl_megatron.models.hf_io import iter_hf_weights, load_hf_weights
    from oapl_megatron.parallel.bootstrap import init_distributed, shutdown
    from oapl_megatron.trainer.batch import SequenceRecord, build_step_batch
    from oapl_megatron.trainer.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                                                  save_checkpoint)
    from oapl_megatron.trainer.optimizer import wrap_and_build_optimizer
    from oapl_megatron.trainer.step import train_step

    OBJ = OAPLObjective(beta1=1.0, beta2=0.5)


P, G = 4, 2


def records_for_step(step: int, vocab: int) -> list:
    """A batch that depends only on the step index, like a data cursor."""
    gen = torch.Generator().manual_seed(1000 + step)
    rewards = torch.randint(0, 2, (P, G), generator=gen).float()
    rewards[0] = torch.tensor([1.0, 0.0])
    adv = oapl_advantages(rewards, 1.0)
    recs = []
    for p in range(P):
        prompt = torch.randint(3, vocab, (3 + p,), generator=gen).tolist()
        for g in range(G):
            resp = torch.randint(3, vocab, (2 + (p * G + g) % 5,), generator=gen).tolist()
            recs.append(SequenceRecord(prompt, resp, advantage=float(adv[p, g]),
                                       ref_logp=float(-2.0 * len(resp) + torch.randn((), generator=gen))))
    return recs


def build(ctx, arch, hf_sd, dropout: float):
    chunks = build_policy(arch, ModelConfig(hidden_dropout=dropout, attention_dropout=dropout), ctx)
    load_hf_weights(chunks, ctx, arch, hf_sd)
    # warmup + cosine, so a lost scheduler state changes the LR of the resumed steps
    optim = OptimConfig(lr=2e-3, clip_grad=1.0, distributed=True,
                        scheduler={"warmup_steps": 2, "min_lr_ratio": 0.1})
    return wrap_and_build_optimizer(chunks, optim, total_steps=8, bf16=False)


def weights(state, ctx, arch) -> dict:
    return {n: t.detach().clone() for n, t in iter_hf_weights(state.chunks, ctx, arch, dst_rank=0,
                                                               include_tied_lm_head=False)}


def adam_state(state, ctx) -> list:
    """Every rank's (exp_avg, exp_avg_sq, step) per parameter shard of the inner torch Adam, gathered to rank 0."""
    opt = state.optimizer
    mine = []
    for o in getattr(opt, "chained_optimizers", [opt]):
        inner = o.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p, {})
                mine.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()})
    allr = [None] * ctx.world_size
    dist.all_gather_object(allr, mine)
    return allr


def hf_source(model, spec, ctx) -> Path:
    """The HF directory of the tiny model (config, weights) next to the checkpoint root: the save's ``hf_dir``."""
    hf_dir = Path(f"{spec['root']}_hf")
    if ctx.rank == 0 and not hf_dir.exists():
        model.save_pretrained(hf_dir)
    dist.barrier()
    return hf_dir


def pause_hook(spec, step: int, rank: int):
    """``on_phase`` for the save of ``step``: stop at spec["pause"]["phase"] (see the module docstring)."""
    pause = spec.get("pause")
    if not pause or pause["step"] != step:
        return None

    def on_phase(phase: str) -> None:
        if phase != pause["phase"]:
            return
        if rank == 0:
            Path(pause["signal"]).write_text(phase)
        time.sleep(3600)  # the test SIGKILLs us here

    return on_phase


def train(ctx, spec, out_dir: Path):
    model = make_model(spec.get("family", "qwen3_untied"), seed=0)
    hf_dir = hf_source(model, spec, ctx)
    arch = arch_from_hf(model.config)
    hf_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    padded = make_vocab_padding(arch.vocab_size, ctx.tp)
    state = build(ctx, arch, hf_sd, spec.get("dropout", 0.0))
    res = {"losses": {}, "lrs": {}, "recorded": {}}
    start = 0
    resume = spec.get("resume")
    if resume:
        path = latest_checkpoint(spec["root"]) if resume == "latest" else Path(resume)
        extra = load_checkpoint(path, state, ctx)
        res["extra"] = extra
        res["loaded_from"] = path.name
        start = extra["step"]
        res["after_load"] = weights(state, ctx, arch)
        res["adam_after_load"] = adam_state(state, ctx)
        res["lr_after_load"] = float(state.optimizer.param_groups[0]["lr"])
    for step in range(start, spec["steps"]):
        batch = build_step_batch(records_for_step(step, arch.vocab_size), dp_rank=ctx.dp_rank, dp_size=ctx.dp,
                                 micro_batch_size=2, pad_id=0)
        m = train_step(state, batch, OBJ, ctx, arch.vocab_size, padded)
        res["losses"][step + 1] = m["loss"]
        res["lrs"][step + 1] = m["lr"]
        if step + 1 in spec.get("save_at", []):
            extra = {"step": step + 1, "cursor": step + 1, "losses": dict(res["losses"]),
                     "buffer": [{"version": step, "tokens": list(range(step + 3))}]}
            save_checkpoint(spec["root"], step + 1, state, ctx, extra, keep_last=spec.get("keep_last", 2),
                            hf_dir=hf_dir, config={"note": "checkpoint test", "layout": [ctx.tp, ctx.pp, ctx.dp]},
                            on_phase=pause_hook(spec, step + 1, ctx.rank))
        if step + 1 in spec.get("record_at", []):
            res["recorded"][step + 1] = weights(state, ctx, arch)
            res.setdefault("adam_recorded", {})[step + 1] = adam_state(state, ctx)
            if ctx.rank == 0:  # written now: a later save of this process may be killed
                torch.save(res["recorded"], out_dir / f"{spec['out']}.recorded.pt")
    res["final"] = weights(state, ctx, arch)
    res["adam"] = adam_state(state, ctx)
    res["dirs"] = sorted(p.name for p in Path(spec["root"]).iterdir()) if Path(spec["root"]).is_dir() else []
    if ctx.rank == 0:
        torch.save(res, out_dir / f"{spec['out']}.pt")


def check_after_kill(ctx, spec, out_dir: Path):
    root = Path(spec["root"])
    res = {"dirs_before": sorted(p.name for p in root.iterdir())}
    latest = latest_checkpoint(root)
    res["latest"] = latest.name if latest else None
    res["dirs_after_latest"] = sorted(p.name for p in root.iterdir())
    model = make_model("qwen3_untied", seed=0)
    arch = arch_from_hf(model.config)
    hf_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    padded = make_vocab_padding(arch.vocab_size, ctx.tp)
    state = build(ctx, arch, hf_sd, 0.0)
    extra = load_checkpoint(latest, state, ctx)
    res["extra_step"] = extra["step"]
    res["loaded"] = weights(state, ctx, arch)
    # Damaged copies of the good checkpoint: each load must fail before touching the state, naming the file.
    errors = {}
    damage = {
        "truncated": lambda d: _truncate(next((d / "model_optim").glob("*.distcp"))),
        "flipped": lambda d: _flip(d / "rng" / "rank0.pt"),
        "missing": lambda d: (d / "extra.pt").unlink(),
        "no_marker": lambda d: (d / "COMPLETE").unlink(),
    }
    for name, fn in damage.items():
        bad = root.parent / f"damaged_{name}" / latest.name
        shutil.copytree(latest, bad)
        target = fn(bad)
        try:
            load_checkpoint(bad, state, ctx)
            errors[name] = None
        except CheckpointError as exc:
            errors[name] = str(exc)
        res.setdefault("targets", {})[name] = str(target) if target else None
    res["errors"] = errors
    res["unchanged_after_failed_loads"] = all(torch.equal(a, b) for a, b in
                                              zip(res["loaded"].values(), weights(state, ctx, arch).values()))
    # Resume: one more step, then a complete save with keep_last=2 prunes only the oldest complete one.
    step = extra["step"]
    batch = build_step_batch(records_for_step(step, arch.vocab_size), dp_rank=0, dp_size=1, micro_batch_size=2,
                             pad_id=0)
    train_step(state, batch, OBJ, ctx, arch.vocab_size, padded)
    save_checkpoint(root, step + 1, state, ctx, {"step": step + 1}, keep_last=2, hf_dir=f"{root}_hf")
    res["dirs_after_save"] = sorted(p.name for p in root.iterdir())
    torch.save(res, out_dir / f"{spec['out']}.pt")


def _truncate(path: Path) -> Path:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path


def _flip(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def main():
    _setup_imports()
    spec = json.loads(sys.argv[1])
    out_dir = Path(os.environ["OAPL_TEST_OUT"])
    ctx = init_distributed(ParallelConfig(tp=spec.get("tp", 1), pp=spec.get("pp", 1), timeout_s=120), seed=0)
    try:
        {"train": train, "check_after_kill": check_after_kill}[spec["mode"]](ctx, spec, out_dir)
    finally:
        shutdown()


if __name__ == "__main__":  # the spawn-context Manager child re-imports this file
    main()
