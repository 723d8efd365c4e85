"""The OAPL training loop — the orchestrator: engines generate asynchronously, the Megatron trainer steps, weights
sync every L steps. The one place that wires the roles (trainer/, rollout/, weight_sync/, tasks/) together.

Process roles (one torchrun job): every rank is a trainer rank (TP × PP × DP); global rank 0 is also the
*driver*: it owns the engine group (spawned locally or attached by address), the task, the rollout buffer and the
producer thread, the run directory and the logs. Per step:

    rank 0: groups ← buffer (wait ≤ loop.wait_timeout_s) → advantages → records ─broadcast (gloo)─▶ all ranks
    all:    [ref log-probs from the frozen copy, if loop.ref_logp_source=trainer] → train_step
    every L steps, all: gather HF tensors (gather_hf_weights) ──▶ rank 0 bucketed broadcast ──▶ engines
    rank 0: clear/trim the buffer, evaluate on schedule, log a metrics line

Run it as ``oapl-train CONFIG [dotted.overrides]`` under torchrun (see README).
"""

from __future__ import annotations

import datetime
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from oapl_megatron.algo import SyncSchedule
from oapl_megatron.config.loader import write_resolved
from oapl_megatron.config.schema import RunConfig
from oapl_megatron.models.builder import build_policy
from oapl_megatron.models.hf_config import arch_from_hf, make_vocab_padding
from oapl_megatron.models.hf_io import gather_hf_weights, load_hf_weights, unwrap
from oapl_megatron.orchestrator.faults import EnginesLost, FaultState, fault_metrics, save_or_report
from oapl_megatron.parallel.bootstrap import ParallelContext, init_distributed, shutdown
from oapl_megatron.profile.loop_hooks import LoopProfiler
from oapl_megatron.trainer.batch import build_step_batch
from oapl_megatron.trainer.optimizer import TrainState, wrap_and_build_optimizer
from oapl_megatron.trainer.step import apply_update, forward_backward, forward_logprobs
from oapl_megatron.weight_sync.bucket import TensorMeta, dtype_name


@dataclass
class Driver:
    """What only global rank 0 holds."""

    engines: object
    producer: object
    buffer: object
    task: object
    tokenizer: object
    log: object
    sync_reports: list = field(default_factory=list)
    # policy version → the optimizer step after which the engines started serving it (the age of a sample in
    # optimizer steps is then (step − 1) − synced_at[version])
    synced_at: dict = field(default_factory=lambda: {0: 0})
    eval_engines: object = None  # started on first use: evaluates the trainer's weights between sync points
    eval_devices: str | None = None  # its CUDA_VISIBLE_DEVICES by the placement rule (None: eval.engine_devices)


@dataclass
class Trainer:
    """What every rank holds."""

    cfg: RunConfig
    ctx: ParallelContext
    arch: object
    state: TrainState
    padded_vocab: int
    control: dist.ProcessGroup | None
    frozen: list | None = None  # trainer-side copy of π_vllm (loop.ref_logp_source=trainer)
    prof: LoopProfiler | None = None  # per-phase times, FLOPs, traces (oapl_megatron.profile.loop_hooks)
    faults: FaultState = field(default_factory=FaultState)


def run(cfg: RunConfig) -> dict:
    """Train; return the last metrics (on rank 0; {} elsewhere)."""
    tr = setup_trainer(cfg)
    start_step, resumed = maybe_resume(tr)
    driver = setup_driver(tr, start_step) if tr.ctx.rank == 0 else None
    last: dict = {}
    try:
        schedule = SyncSchedule(cfg.loop.lag)
        if resumed is not None:  # the fresh engines get the restored weights before any generation
            sync_weights(tr, driver, start_step, version=resumed["policy_version"])
        if driver is not None:
            driver.producer.start()
        if cfg.eval.every and start_step == 0:
            evaluation = evaluate_policy(tr, driver, 0, synced=True)
            if driver is not None:
                driver.log.step(0, {"policy_version": 0, **evaluation})
        prof = tr.prof
        for step in range(start_step + 1, cfg.train.steps + 1):
            prof.begin_step(step)
            try:
                metrics = train_one_step(tr, driver, step)
            except EnginesLost:
                _save_at_last_sync_point(tr, driver, step - 1)
                raise
            last_step = step == cfg.train.steps
            synced = schedule.should_sync(step) or last_step
            if synced:
                with prof.phase("sync_other"):
                    metrics.update(sync_weights(tr, driver, step))
                prof.book_sync(driver.sync_reports[-1] if driver is not None else None)
            if cfg.checkpoint.due(step) or (last_step and _final_save(cfg, step, driver)):
                with prof.phase("checkpoint"):
                    metrics["checkpoint_s"] = save(tr, driver, step)
            if cfg.eval.every and (step % cfg.eval.every == 0 or last_step):
                with prof.phase("evaluation"):
                    metrics.update(evaluate_policy(tr, driver, step, synced))
            metrics.update(prof.end_step(step, driver.engines if driver is not None else None))
            if driver is not None:
                with prof.phase("logging"):  # booked to the next step (see profile/loop_hooks.py)
                    driver.log.step(step, metrics)
                last = metrics
            prof.after_step(step)
            if schedule.should_sync(step) and not last_step:
                with prof.phase("bookkeeping"):  # a collective: booked to the next step, like logging
                    preempt = _preemption_requested(tr)
                if preempt:
                    _checkpoint_and_exit(tr, driver, step, saved="checkpoint_s" in metrics)
        if cfg.export.final_hf:
            export_hf(tr, Path(cfg.run_dir) / "final_hf", driver)
    finally:
        if tr.prof is not None:
            tr.prof.close()
        if driver is not None:
            driver.producer.stop()
            driver.engines.shutdown()
            if driver.eval_engines is not None:
                driver.eval_engines.shutdown()
            driver.log.close()
        shutdown()
    return last


# Exit code of every trainer rank after a preemption checkpoint (EX_TEMPFAIL: "try again"); torchrun reports it as
# a failure, so the Slurm batch script looks for run_dir/preempted.json instead.
PREEMPTED_EXIT_CODE = 75
PREEMPT_REQUEST = "PREEMPT"       # run_dir/PREEMPT: written by the batch script's SIGTERM trap (launch/templates)
PREEMPTED_MARKER = "preempted.json"


def _preemption_requested(tr: Trainer) -> bool:
    """Collective at a sync point: rank 0 looks for run_dir/PREEMPT, every rank gets its answer."""
    asked = (Path(tr.cfg.run_dir) / PREEMPT_REQUEST).exists() if tr.ctx.rank == 0 else None
    return bool(_broadcast_object(asked, tr))


def _checkpoint_and_exit(tr: Trainer, driver: Driver | None, step: int, saved: bool) -> None:
    """Preemption: a resumable checkpoint at this sync point (unless one was just taken), a marker for the batch
    script, then exit every rank with PREEMPTED_EXIT_CODE (run()'s finally stops the engines)."""
    import json

    seconds = 0.0 if saved else save(tr, driver, step)
    if driver is not None:
        marker = {"step": step, "policy_version": driver.engines.version, "checkpoint_s": round(seconds, 3)}
        (Path(tr.cfg.run_dir) / PREEMPTED_MARKER).write_text(json.dumps(marker))
        driver.log.print(f"[oapl-train] preemption requested: checkpointed step {step}; exiting with code "
                         f"{PREEMPTED_EXIT_CODE} (resume with --resume)")
    raise SystemExit(PREEMPTED_EXIT_CODE)


def _final_save(cfg: RunConfig, step: int, driver: Driver | None) -> bool:
    """Whether the run's last step gets a checkpoint (checkpoint.save_on_exit). A resumable checkpoint must be taken
    at a sync point of the L-step schedule, so a run whose length is not a multiple of L is not saved at its end:
    say so (rank 0) instead of skipping silently; the final HF export still holds the last weights."""
    if not cfg.checkpoint.save_on_exit:
        return False
    if step % cfg.loop.lag == 0:
        return True
    if driver is not None:
        last = step - step % cfg.loop.lag
        driver.log.print(f"[oapl-train] no final checkpoint: train.steps={step} is not a multiple of loop.lag="
                         f"{cfg.loop.lag}, and a resumable checkpoint must sit on a sync point; the last one is step "
                         f"{last} (set train.steps to a multiple of loop.lag to save at the end)")
    return False


def maybe_resume(tr: Trainer) -> tuple[int, dict | None]:
    """With checkpoint.resume: load the newest checkpoint that is complete and intact (rank 0 lists them, every
    rank loads); an incomplete or corrupted newer one is skipped with a message naming it and why."""
    from oapl_megatron.orchestrator.faults import marker_problem, resume_candidates
    from oapl_megatron.trainer.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    cfg = tr.cfg
    if not cfg.checkpoint.resume:
        return 0, None
    root = cfg.checkpoint.resolve_dir(Path(cfg.run_dir))
    listed = None
    if tr.ctx.rank == 0:
        latest_checkpoint(root)  # removes the temp dirs of interrupted saves
        listed = [(p, marker_problem(p)) for p in resume_candidates(root)]
    path, extra, skipped = None, None, []
    for candidate, problem in _broadcast_object(listed, tr):
        if problem is None:
            try:
                extra = load_checkpoint(candidate, tr.state, tr.ctx)  # checks every file before changing anything
                path = candidate
                break
            except CheckpointError as e:  # raised on every rank alike
                problem = str(e)
        skipped.append(candidate)
        if tr.ctx.rank == 0:
            print(f"[oapl-train] --resume: skipping {candidate}: {problem}; trying the previous checkpoint",
                  flush=True)
    if tr.ctx.rank == 0:
        for bad in skipped:  # kept for inspection, out of the way of this run's save of the same step
            bad.rename(bad.with_name(bad.name + ".unusable"))
            print(f"[oapl-train] --resume: moved {bad} to {bad.name}.unusable", flush=True)
    if path is None:
        if tr.ctx.rank == 0:
            print(f"[oapl-train] --resume: no usable checkpoint under {root}; starting from step 0", flush=True)
        return 0, None
    if tr.frozen is not None:
        _copy_into_frozen(tr)  # checkpoints are taken right after a sync: π_vllm = the restored weights
    if tr.ctx.rank == 0:
        print(f"[oapl-train] resumed from {path} (step {extra['step']}, policy version {extra['policy_version']})",
              flush=True)
    return int(extra["step"]), extra


def save(tr: Trainer, driver: Driver | None, step: int) -> float:
    """Collective: a resumable checkpoint right after a sync (the engines serve exactly the saved weights). A save
    that fails is reported and the run goes on, unless checkpoint.on_save_error=stop (orchestrator/faults.py)."""
    from oapl_megatron.trainer.checkpoint import latest_checkpoint, save_checkpoint

    extra = None
    if driver is not None:
        extra = {"step": step, "policy_version": driver.engines.version,
                 # every version consumed exactly its L × P groups, so the prompt cursor is step × P
                 "prompts_consumed": step * tr.cfg.train.prompts_per_step}
    root = tr.cfg.checkpoint.resolve_dir(Path(tr.cfg.run_dir))
    seconds, _ = save_or_report(
        lambda: save_checkpoint(root, step, tr.state, tr.ctx, extra or {}, keep_last=tr.cfg.checkpoint.keep_last,
                                hf_dir=tr.cfg.model.hf_path, config=tr.cfg.model_dump(mode="json")),
        step, tr.faults, stop_on_error=tr.cfg.checkpoint.on_save_error == "stop",
        log=driver.log.print if driver is not None else None,
        previous=latest_checkpoint(root, cleanup=False) if driver is not None else None)
    return seconds


def _save_at_last_sync_point(tr: Trainer, driver: Driver | None, last_step: int) -> None:
    """No engine is left: checkpoint the last completed step if it is a sync point not saved yet (a resumable
    checkpoint must sit on one); otherwise the newest checkpoint is the one to resume from. Collective."""
    cfg = tr.cfg
    if last_step > 0 and last_step % cfg.loop.lag == 0 and not cfg.checkpoint.due(last_step):
        save(tr, driver, last_step)
    elif driver is not None:
        driver.log.print(f"[oapl-train] no engine left after step {last_step}: resume from the newest checkpoint "
                         f"under {cfg.checkpoint.resolve_dir(Path(cfg.run_dir))} (step {last_step} is not an "
                         "unsaved sync point)")


def setup_trainer(cfg: RunConfig) -> Trainer:
    if cfg.model.hf_path is None:
        raise ValueError("model.hf_path is required: a directory with config.json and safetensors weights")
    ctx = init_distributed(cfg.parallel, cfg.train.seed)
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.loop.wait_timeout_s + 120)) \
        if dist.is_initialized() and ctx.world_size > 1 else None
    arch = arch_from_hf(cfg.model.hf_path)
    chunks = build_policy(arch, cfg.model, ctx)
    load_hf_weights(chunks, ctx, arch, cfg.model.hf_path)
    frozen = None
    if cfg.loop.ref_logp_source == "trainer":
        frozen = build_policy(arch, cfg.model, ctx)
        load_hf_weights(frozen, ctx, arch, cfg.model.hf_path)
        for c in frozen:
            c.requires_grad_(False)
    bf16 = next(chunks[0].parameters()).dtype == torch.bfloat16
    state = wrap_and_build_optimizer(chunks, cfg.optim, cfg.train.steps, bf16=bf16)
    if ctx.rank == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, Path(cfg.run_dir) / "config.yaml")
    return Trainer(cfg, ctx, arch, state, make_vocab_padding(arch.vocab_size, ctx.tp), control, frozen,
                   LoopProfiler(cfg, ctx.rank, ctx.world_size, arch),
                   faults=FaultState(max_consecutive_skips=cfg.loop.max_consecutive_skips))


def setup_driver(tr: Trainer, start_step: int = 0) -> Driver:
    """Engines, task, buffer and the (not yet started) producer; ``start_step`` > 0 when resuming."""
    from transformers import AutoTokenizer

    from oapl_megatron.rollout.buffer import RolloutBuffer
    from oapl_megatron.rollout.producer import RolloutProducer
    from oapl_megatron.rollout.engine_group import EngineGroup
    from oapl_megatron.tasks.registry import make_task
    from oapl_megatron.orchestrator.metrics import MetricsLogger

    cfg = tr.cfg
    run_dir = Path(cfg.run_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    task = make_task(cfg.task, tokenizer)
    devices = _engine_devices(cfg)
    engines = EngineGroup(cfg.model.hf_path, cfg.rollout, cfg.weight_sync, log_dir=run_dir / "engines",
                          engine_devices=devices[:cfg.rollout.engines] if devices else None).start()
    try:
        buffer = RolloutBuffer(cfg.loop.buffer_groups, cfg.loop.buffer, cfg.loop.max_staleness)
        budget = cfg.loop.lag * cfg.train.prompts_per_step if cfg.loop.buffer == "clear" else None
        producer = RolloutProducer(engines, task, tokenizer, buffer, cfg.rollout, cfg.loop,
                                   cfg.train.samples_per_prompt, cfg.train.seed, groups_per_version=budget,
                                   start_index=start_step * cfg.train.prompts_per_step)
        log = MetricsLogger(run_dir, cfg.train.steps, cfg.logging, start_step=start_step).__enter__()
    except BaseException:
        engines.shutdown()
        raise
    driver = Driver(engines, producer, buffer, task, tokenizer, log, synced_at={engines.version: start_step})
    if devices and len(devices) > cfg.rollout.engines:
        driver.eval_devices = devices[-1]
    return driver


def _needs_eval_engine(cfg: RunConfig) -> bool:
    """eval.policy=current evaluates between sync points on an evaluation engine of its own (see evaluate_policy)."""
    return bool(cfg.eval.every) and cfg.eval.policy == "current" and cfg.eval.every % cfg.loop.lag != 0


def _engine_devices(cfg: RunConfig) -> list[str | None] | None:
    """Local mode: CUDA_VISIBLE_DEVICES of each generation engine by the placement rule (trainer local ranks on GPUs
    0..T−1, engines on the next engine_tp GPUs each, or rollout.devices), then of the evaluation engine when one is
    needed and eval.engine_devices is unset; None everywhere on a CPU node."""
    if cfg.rollout.mode != "local":
        return None
    from oapl_megatron.launch.placement import parse_visible, place_node

    extra = _needs_eval_engine(cfg) and cfg.eval.engine_devices is None and cfg.rollout.devices is None
    engines = cfg.rollout.engines + int(extra)
    place = place_node(torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1)), engines,
                       cfg.rollout.engine_tp, cfg.rollout.devices,
                       visible=parse_visible(os.environ.get("CUDA_VISIBLE_DEVICES")),
                       ranks_field="torchrun --nproc-per-node")
    print(f"[oapl-train] {place.describe()}" + (f" (engine {engines - 1}: evaluation)" if extra else ""), flush=True)
    return [place.engine_env(i).get("CUDA_VISIBLE_DEVICES") for i in range(engines)]


def _broadcast_object(obj, tr: Trainer):
    if tr.control is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=tr.control)
    return box[0]


def _collect_batch(tr: Trainer, driver: Driver | None, step: int):
    """Rank 0 takes this step's groups from the buffer; every rank receives the same records."""
    payload = None
    if driver is not None:
        t0 = time.perf_counter()
        try:
            with tr.prof.phase("wait_for_data"):
                groups = driver.producer.take(tr.cfg.train.prompts_per_step, tr.cfg.loop.wait_timeout_s)
        except Exception as e:  # every rank learns of it now, instead of waiting for a batch until the timeout
            _broadcast_object(_RolloutFailed(str(e), _no_engine_left(e)), tr)
            if _no_engine_left(e):
                raise EnginesLost(f"step {step}: {e}") from e
            raise
        wait_s = time.perf_counter() - t0
        with tr.prof.phase("batch_build"):
            payload = _records_and_info(tr, driver, groups, step, wait_s)
    with tr.prof.phase("batch_broadcast"):
        payload = _broadcast_object(payload, tr)
    if isinstance(payload, _RolloutFailed):  # ranks other than 0
        raise (EnginesLost if payload.no_engine else RuntimeError)(f"step {step}: rank 0: {payload.message}")
    return payload


def _records_and_info(tr: Trainer, driver: Driver, groups: list, step: int, wait_s: float) -> tuple[list, dict]:
    """Rank 0: this step's trainer records (advantages from whole groups) and what the step logs about its data."""
    from oapl_megatron.orchestrator.records import groups_to_records

    records = groups_to_records(groups, tr.cfg.objective)
    cur = driver.buffer.current_version
    rewards = [r for g in groups for r in g.rewards]
    # the age of each group in optimizer steps: the weights being trained have taken step − 1 steps, the
    # weights that generated the group had taken synced_at[version] (OAPL's lag, sample by sample)
    ages = [(step - 1) - driver.synced_at[g.version] for g in groups]
    info = {
        "policy_version": cur,
        "staleness_mean": sum(cur - g.version for g in groups) / len(groups),  # in policy versions
        "lag_steps_mean": sum(ages) / len(ages),
        "lag_steps_max": max(ages),
        "reward_mean": sum(rewards) / len(rewards),
        "response_len_mean": sum(len(r.response_ids) for r in records) / max(1, len(records)),
        "wait_for_data_s": wait_s,
        # data accounting: which prompts of the stream this step consumed (a resumed run must match)
        "prompt_index_first": min(g.stream_index for g in groups),
        "prompt_index_last": max(g.stream_index for g in groups),
        "prompt_ids_crc": zlib.crc32("|".join(f"{g.stream_index}:{g.prompt.id}" for g in groups).encode()),
    }
    return records, info


@dataclass
class _RolloutFailed:
    message: str
    no_engine: bool


def _no_engine_left(e: BaseException) -> bool:
    from oapl_megatron.rollout.engine_group import NoEngineError

    while e is not None:
        if isinstance(e, NoEngineError):
            return True
        e = e.__cause__
    return False


def train_one_step(tr: Trainer, driver: Driver | None, step: int) -> dict:
    records, info = _collect_batch(tr, driver, step)
    ctx, cfg = tr.ctx, tr.cfg
    with tr.prof.phase("batch_build"):
        batch = build_step_batch(records, dp_rank=ctx.dp_rank, dp_size=ctx.dp,
                                 micro_batch_size=cfg.train.micro_batch_size, pad_id=0)
        tr.prof.batch_stats(records, ref_forward=tr.frozen is not None)
    if tr.frozen is not None:
        with tr.prof.phase("ref_logp"):
            info["ref_logp_engine_vs_trainer"] = _use_trainer_reference(tr, batch)
    t0 = time.perf_counter()
    # trainer.step.train_step, in its two halves so that each is timed
    with tr.prof.phase("trainer_fwd_bwd"):
        metrics = forward_backward(tr.state, batch, cfg.objective, ctx, tr.arch.vocab_size, tr.padded_vocab,
                                   cfg.rollout.logprob_temperature)
    with tr.prof.phase("optimizer"):
        metrics = apply_update(tr.state, metrics)
    dt = time.perf_counter() - t0
    with tr.prof.phase("bookkeeping"):
        metrics.update(info)
        tr.faults.after_step(step, metrics, log=driver.log.print if driver is not None else None)
        metrics["train_step_s"] = dt
        metrics["train_tokens_per_s"] = metrics["response_tokens"] / dt if dt > 0 else 0.0
        if driver is not None:
            metrics.update(_driver_metrics(tr, driver))
    return metrics


def _driver_metrics(tr: Trainer, driver: Driver) -> dict:
    """Rank 0's per-step view of the rollout side: engine idleness, buffer, faults, the reward pool."""
    util = driver.engines.utilization()
    pool = driver.producer.reward_stats()  # the reward pool: throughput and backlog (verdicts in reward_pool.json)
    return {
        "engine_idle_fraction": sum(u["idle_fraction"] for u in util.values()) / max(1, len(util)),
        "buffer_groups": len(driver.buffer),
        "dropped_stale_groups": driver.buffer.dropped_stale,
        **fault_metrics(driver.engines, driver.producer),
        "checkpoint_failures": tr.faults.checkpoint_failures,
        "reward_groups_pending": pool["groups_pending"],
        "reward_programs_per_s": pool["programs_per_s"],
        "reward_score_s_per_response": pool["score_s_per_response"],
    }


def _use_trainer_reference(tr: Trainer, batch) -> float:
    """Replace the engine's reference log-probs by the frozen trainer copy's; return their mean |difference| per
    sequence (engine vs trainer numerics of the same weights, a health metric)."""
    lps = forward_logprobs(tr.frozen, batch, tr.ctx, tr.arch.vocab_size, tr.padded_vocab,
                           tr.cfg.rollout.logprob_temperature)
    diffs, n = 0.0, 0.0
    for mb, (lp, _) in zip(batch.micro_batches, lps):
        tok = lp * mb.mask
        seq = tok.sum(dim=1)
        diffs += float(((seq - mb.ref_logp).abs() * mb.valid).sum())
        n += float(mb.valid.sum())
        mb.ref_token_logp = tok
        mb.ref_logp = seq
    return diffs / max(n, 1.0)


def sync_weights(tr: Trainer, driver: Driver | None, step: int, version: int | None = None) -> dict:
    """Collective over all trainer ranks: gather full HF tensors to rank 0, which broadcasts them to the engines.
    The engines then serve the next version, or ``version`` (resume: the restored run's version), from optimizer
    step ``step`` on."""
    t0 = time.perf_counter()
    metas, named = _gather_for_sync(tr)
    if tr.prof is not None:
        named = tr.prof.timed_stream(named)
    out: dict = {}
    if driver is not None:
        report = driver.engines.sync_weights(named, metas=metas, version=version)
        dropped = driver.buffer.on_sync(report.version)
        driver.producer.on_sync()
        driver.sync_reports.append(report)
        driver.synced_at[report.version] = step
        out = {"sync_s": time.perf_counter() - t0, "sync_dropped_groups": dropped,
               "policy_version": report.version}
        for k in ("pack_s", "broadcast_s", "verify_s", "load_s"):
            out[f"sync_{k}"] = getattr(report, k)
        out["sync_bytes"] = report.payload_bytes
    else:
        for _ in named:  # ranks other than 0 take part in the gather
            pass
    if tr.frozen is not None:
        _copy_into_frozen(tr)
    return out


def _gather_for_sync(tr: Trainer) -> tuple[list[TensorMeta], Iterator]:
    """The sync's tensor metadata (from the architecture, no tensor materialised) and the lazy gather: rank 0
    plans the buckets up front and packs each tensor as the gather yields it, holding a few buckets, not the
    model. Collective over the trainer ranks (the dtype table now; the gather while iterating)."""
    metas, named = gather_hf_weights(tr.state.chunks, tr.ctx, tr.arch, dst_rank=0, include_tied_lm_head=True)
    return [TensorMeta(n, dtype_name(d), tuple(s)) for n, d, s in metas], named


@torch.no_grad()
def _copy_into_frozen(tr: Trainer) -> None:
    live = [dict(unwrap(c).named_parameters()) for c in tr.state.chunks]
    for chunk, params in zip(tr.frozen, live):
        for name, p in chunk.named_parameters():
            p.copy_(params[name])


def evaluate_policy(tr: Trainer, driver: Driver | None, step: int, synced: bool) -> dict:
    """Held-out evaluation after optimizer step ``step`` (``synced``: the generation engines were just synced, so
    they serve the trainer's current weights). Collective when eval.policy=current between sync points (every rank
    takes part in the weight gather for the evaluation engine); returns the metrics on rank 0, {} elsewhere."""
    from oapl_megatron.orchestrator.evaluation import evaluate

    cfg = tr.cfg
    if cfg.eval.policy == "served" or synced:
        if driver is None:
            return {}
        served_step = driver.synced_at[driver.engines.version]
        out = evaluate(driver.engines, driver.task, driver.tokenizer, cfg.eval, cfg.rollout)
        out.update(eval_policy="current" if served_step == step else "served", eval_weights_step=served_step)
        return out
    metas, named = _gather_for_sync(tr)
    if driver is None:
        for _ in named:  # ranks other than 0 take part in the gather
            pass
        return {}
    engines = _eval_engines(driver, cfg)
    engines.sync_weights(named, metas=metas)
    out = evaluate(engines, driver.task, driver.tokenizer, cfg.eval, cfg.rollout)
    out.update(eval_policy="current", eval_weights_step=step)
    return out


def _eval_engines(driver: Driver, cfg: RunConfig):
    """The evaluation engine (one, local), started on first use."""
    if driver.eval_engines is None:
        from oapl_megatron.rollout.engine_group import EngineGroup

        rollout = cfg.rollout.model_copy(update={"engines": 1, "mode": "local", "addresses": []})
        driver.eval_engines = EngineGroup(cfg.model.hf_path, rollout, cfg.weight_sync,
                                          log_dir=Path(cfg.run_dir) / "eval_engine",
                                          engine_devices=[cfg.eval.engine_devices or driver.eval_devices]).start()
    return driver.eval_engines


def export_hf(tr: Trainer, out_dir: Path, driver: Driver | None) -> None:
    """Write the policy as a Hugging Face checkpoint (safetensors + config + tokenizer) that transformers and vLLM
    load as they are. Collective over all trainer ranks (the weight gather); rank 0 writes."""
    from oapl_megatron.models.convert import write_hf_checkpoint

    write_hf_checkpoint(tr.state.chunks, tr.ctx, tr.arch, out_dir, side_files_dir=tr.cfg.model.hf_path,
                        dtype=tr.cfg.export.dtype)
    if driver is not None:
        driver.log.print(f"exported the final policy to {out_dir}")
