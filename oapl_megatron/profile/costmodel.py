"""The cost model behind ``oapl-profile model``: how long an OAPL step takes, how much of it is weight sync, how
idle the engines are, which lag L keeps them busy, and how a run scales from 8 to 1024 GPUs.

Pure arithmetic (no torch, no distributed imports). Two layers:

1. **Components** — three times per optimizer step of the loop:
   ``train_s`` (trainer forward/backward + optimizer for one step), ``gen_s`` (the engines' time to generate one
   step's P·G samples) and ``sync_s`` (one weight sync: gather + broadcast + engine load). They come either from
   a roofline of the hardware with efficiencies (:func:`gpu_components`) or from measured rates
   (:func:`measured_components`, what ``oapl-profile scaling`` and ``run`` produce on this machine).
2. **The pipeline** (:func:`pipeline`) — the loop's schedule with ``loop.buffer=clear``: after a sync the engines
   generate L·P·G samples with the new weights while the trainer consumes them P·G at a time; the next sync
   waits for both. One *version period* is therefore::

       period = sync_s + max(L·gen_s + train_s,         # engine-bound: the last step waits for the last samples
                             gen_s + L·train_s,          # trainer-bound: the first step waits for the first samples
                             capacity)                   # shared cores only: total work / cores

   ``capacity`` applies when trainer and engines share processors (the CPU demo; on a GPU cluster they run on
   separate devices and it is 0): (L·gen_s·gen_cores + L·train_s·train_cores) / cores. The step time is
   period / L; the engines' idle fraction is 1 − L·gen_s / period; the trainer's wait fraction is
   1 − L·train_s / period.

GPU roofline (:func:`gpu_components`), all per optimizer step:

- trainer: model FLOPs (:mod:`oapl_megatron.profile.flops`) / (N · peak · MFU(tokens per GPU)) · (1 + pipeline
  bubble (pp−1)/micro-batches) + the exposed DP gradient reduce-scatter/all-gather (ring, 2·(dp−1)/dp · fp32 grads
  of a model-parallel shard / link bandwidth) + the optimizer (Adam reads/writes 32 bytes per parameter of its
  shard through HBM). MFU(x) = mfu_max · x / (x + mfu_half_tokens), x = tokens per DP replica per step: small batches
  per GPU under-fill the device — the effect that bends strong scaling.
- engines: decoding is memory-bound: every decode iteration reads the weights and the batch's KV cache, so an
  iteration costs max((weights + B·KV(avg context)) / (tp_e · HBM · gen_mem_eff), B·decode FLOPs / (tp_e · peak ·
  gen_compute_eff)); the batch B is limited by the KV cache that fits in HBM and by the sequences available per
  engine; prefill is compute-bound. gen_s = one version's L·P·G samples spread over the engine instances, / L.
- sync: bf16 weights gathered from the trainer's model-parallel shards (intra-node link) and broadcast to the
  engines (pipelined broadcast: ≈ one payload over the slowest link, independent of the receivers), then loaded
  (HBM copy), plus a fixed latency.

The efficiencies are the model's assumptions; ``calibrate_*`` fit them to measured points and the model then
reproduces those points (tests/test_profile_costmodel.py). Every prediction returns its inputs and assumptions.
"""

from __future__ import annotations

import dataclasses
import math

from oapl_megatron.models.hf_config import ArchSpec
from oapl_megatron.profile.flops import (decode_flops_per_token, dense_forward_flops_per_token, kv_bytes_per_token,
                                         train_flops, weight_bytes)
from oapl_megatron.profile.presets import GPUSpec


@dataclasses.dataclass(frozen=True)
class Components:
    """Per-optimizer-step times of the three parts of the loop (seconds)."""

    train_s: float
    gen_s: float
    sync_s: float
    # Shared processors (CPU): total cores and how many each side keeps busy; cores=None = separate devices.
    cores: float | None = None
    train_cores: float = 0.0
    gen_cores: float = 0.0


@dataclasses.dataclass(frozen=True)
class Pipeline:
    lag: int
    period_s: float  # one policy version: L optimizer steps + one sync
    step_s: float  # period / L
    engine_idle_fraction: float
    trainer_wait_fraction: float
    sync_per_step_s: float  # sync / L
    bound: str  # "engines", "trainer" or "cores"


def pipeline(c: Components, lag: int) -> Pipeline:
    """The loop's schedule (see the module docstring) for lag L."""
    if lag < 1:
        raise ValueError(f"lag={lag} must be >= 1")
    eng = lag * c.gen_s + c.train_s
    trn = c.gen_s + lag * c.train_s
    cap = 0.0
    if c.cores:
        cap = (lag * c.gen_s * c.gen_cores + lag * c.train_s * c.train_cores) / c.cores
    body = max(eng, trn, cap)
    bound = "cores" if cap > max(eng, trn) else ("engines" if eng >= trn else "trainer")
    period = c.sync_s + body
    return Pipeline(lag, period, period / lag, max(0.0, 1.0 - lag * c.gen_s / period),
                    max(0.0, 1.0 - lag * c.train_s / period), c.sync_s / lag, bound)


def lag_to_saturate(c: Components, idle_target: float = 0.1, max_lag: int = 100_000) -> int | None:
    """Smallest L whose engine idle fraction is ≤ ``idle_target``; None if no L up to ``max_lag`` gets there (the
    engines out-run the trainer: idle → 1 − gen_s/train_s however long the lag)."""
    lo, hi = 1, max_lag
    if pipeline(c, hi).engine_idle_fraction > idle_target:
        return None
    while lo < hi:  # idle fraction falls monotonically with L
        mid = (lo + hi) // 2
        if pipeline(c, mid).engine_idle_fraction <= idle_target:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---------------------------------------------------------------- GPU roofline


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """The model's assumptions: the fraction of each roofline a real stack reaches.

    Defaults: trainer MFU saturates at Megatron-LM's best published 45 % and passes through prime-rl's Qwen3-4B RL
    point on 8×H200 (14.7 % at 16K tokens per GPU; its 64K point, 36.1 %, comes out 30 %) → half point 33K tokens
    (shared/notes/profiling.md); decode at 60 % of HBM bandwidth
    and 40 % of peak (vLLM-class engines); weight sync at 70 % of the link (NeMo-RL's refit of Qwen3-4B, 0.21–0.34 s,
    implies ≈ 40–60 % of 400 Gb/s), 0.1 s fixed latency; DP communication fully exposed (no overlap)."""

    mfu_max: float = 0.45
    mfu_half_tokens: float = 33_000.0
    gen_mem_eff: float = 0.60
    gen_compute_eff: float = 0.40
    sync_bw_eff: float = 0.70
    sync_latency_s: float = 0.1
    dp_comm_exposed: float = 1.0
    kv_mem_fraction: float = 0.9  # of the HBM left after the weights
    train_mem_fraction: float = 0.8  # of HBM the trainer's weights, grads and optimizer state may take


@dataclasses.dataclass(frozen=True)
class Workload:
    arch: ArchSpec
    prompts_per_step: int  # P
    samples_per_prompt: int  # G
    prompt_len: int
    response_len: int  # mean generated tokens per sample
    micro_batch_tokens: int = 16_384  # tokens per micro-batch (sets the pipeline's micro-batch count)


@dataclasses.dataclass(frozen=True)
class Cluster:
    gpu: GPUSpec
    trainer_gpus: int
    engine_gpus: int
    tp: int = 1
    pp: int = 1
    engine_tp: int = 1
    dtype: str = "bf16"

    @property
    def dp(self) -> int:
        return self.trainer_gpus // (self.tp * self.pp)


def trainer_step_s(w: Workload, cl: Cluster, eff: Efficiency) -> dict:
    a, g = w.arch, cl.gpu
    n = cl.trainer_gpus
    seq = w.prompt_len + w.response_len
    samples = w.prompts_per_step * w.samples_per_prompt
    tokens = samples * seq
    flops = train_flops(a, [seq]) * samples
    per_gpu_tokens = tokens / cl.dp  # tokens per DP replica (its TP/PP group works on them together)
    mfu = eff.mfu_max * per_gpu_tokens / (per_gpu_tokens + eff.mfu_half_tokens)
    compute = flops / (n * g.peak_flops[cl.dtype] * mfu)
    micro_batches = max(1.0, tokens / cl.dp / w.micro_batch_tokens)
    bubble = (cl.pp - 1) / micro_batches
    shard_params = a.num_params / (cl.tp * cl.pp)
    link = g.nvlink_bytes_per_s if n <= g.gpus_per_node else g.net_bytes_per_s
    dp_comm = 2 * (cl.dp - 1) / cl.dp * 4 * shard_params / link * eff.dp_comm_exposed if cl.dp > 1 else 0.0
    optim = 32 * shard_params / cl.dp / g.hbm_bytes_per_s  # distributed Adam: 32 B/param read+write on its shard
    total = compute * (1 + bubble) + dp_comm + optim
    # bf16 weights + fp32 main grads + fp32 master weights and two Adam moments sharded over DP (activations are
    # left out: recomputation or a smaller micro-batch makes them fit); the trainer must hold this.
    state_bytes = shard_params * (2 + 4 + 12 / cl.dp)
    if state_bytes > eff.train_mem_fraction * g.hbm_bytes:
        raise ValueError(f"trainer state {state_bytes / 1e9:.0f} GB per GPU does not fit {g.name} "
                         f"(tp={cl.tp}, pp={cl.pp}, dp={cl.dp})")
    return {"train_s": total, "state_gb_per_gpu": state_bytes / 1e9, "compute_s": compute, "bubble_fraction": bubble,
            "dp_comm_s": dp_comm,
            "optimizer_s": optim, "mfu_assumed": mfu, "model_flops": flops, "tokens": tokens,
            "achieved_mfu": flops / total / (n * g.peak_flops[cl.dtype])}


def generation_s(w: Workload, cl: Cluster, eff: Efficiency, samples: int) -> dict:
    """Time for the engines to generate ``samples`` samples (spread evenly over the engine instances)."""
    a, g = w.arch, cl.gpu
    instances = max(1, cl.engine_gpus // cl.engine_tp)
    per_engine = math.ceil(samples / instances)
    wbytes = weight_bytes(a, 2)
    ctx_max = w.prompt_len + w.response_len
    kv_budget = (g.hbm_bytes * cl.engine_tp - wbytes) * eff.kv_mem_fraction
    if kv_budget <= 0:
        raise ValueError(f"{a.num_params / 1e9:.1f}B parameters do not fit {cl.engine_tp} × {g.name} for generation")
    kv_cap = max(1, int(kv_budget // (kv_bytes_per_token(a) * ctx_max)))
    batch = max(1, min(per_engine, kv_cap))
    waves = math.ceil(per_engine / batch)
    avg_ctx = w.prompt_len + w.response_len / 2
    mem = (wbytes + batch * kv_bytes_per_token(a) * avg_ctx) / (cl.engine_tp * g.hbm_bytes_per_s * eff.gen_mem_eff)
    comp = batch * decode_flops_per_token(a, int(avg_ctx)) / (cl.engine_tp * g.peak_flops[cl.dtype]
                                                                * eff.gen_compute_eff)
    t_iter = max(mem, comp)
    prefill = batch * (dense_forward_flops_per_token(a) * w.prompt_len) / (
        cl.engine_tp * g.peak_flops[cl.dtype] * eff.gen_compute_eff)
    total = waves * (w.response_len * t_iter + prefill)
    return {"gen_s": total, "decode_batch": batch, "kv_batch_cap": kv_cap, "waves": waves,
            "decode_iter_s": t_iter, "decode_bound": "memory" if mem >= comp else "compute",
            "tokens_per_s_per_gpu": samples * w.response_len / total / cl.engine_gpus}


def sync_s(w: Workload, cl: Cluster, eff: Efficiency) -> dict:
    g = cl.gpu
    payload = weight_bytes(w.arch, 2)
    mp = cl.tp * cl.pp
    gather = payload * (1 - 1 / mp) / (g.nvlink_bytes_per_s * eff.sync_bw_eff) if mp > 1 else 0.0
    link = g.net_bytes_per_s if cl.trainer_gpus + cl.engine_gpus > g.gpus_per_node else g.nvlink_bytes_per_s
    bcast = payload / cl.engine_tp / (link * eff.sync_bw_eff)  # each engine TP rank receives its shard
    load = payload / cl.engine_tp / g.hbm_bytes_per_s
    return {"sync_s": eff.sync_latency_s + gather + bcast + load, "payload_bytes": payload, "gather_s": gather,
            "broadcast_s": bcast, "load_s": load}


def gpu_components(w: Workload, cl: Cluster, lag: int, eff: Efficiency = Efficiency()) -> tuple[Components, dict]:
    tr = trainer_step_s(w, cl, eff)
    samples = lag * w.prompts_per_step * w.samples_per_prompt
    gen = generation_s(w, cl, eff, samples)
    sy = sync_s(w, cl, eff)
    detail = {"trainer": tr, "generation": gen, "sync": sy}
    return Components(tr["train_s"], gen["gen_s"] / lag, sy["sync_s"]), detail


def predict(w: Workload, cl: Cluster, lag: int, eff: Efficiency = Efficiency(), idle_target: float = 0.1) -> dict:
    """Everything ``oapl-profile model`` prints for one configuration."""
    comps, detail = gpu_components(w, cl, lag, eff)
    p = pipeline(comps, lag)
    n_total = cl.trainer_gpus + cl.engine_gpus
    tokens = w.prompts_per_step * w.samples_per_prompt * (w.prompt_len + w.response_len)
    return {
        "gpus": n_total, "trainer_gpus": cl.trainer_gpus, "engine_gpus": cl.engine_gpus, "lag": lag,
        "layout": {"tp": cl.tp, "pp": cl.pp, "dp": cl.dp, "engine_tp": cl.engine_tp},
        "train_s": comps.train_s, "gen_s_per_step": comps.gen_s, "gen_s_per_version": comps.gen_s * lag,
        "sync_s": comps.sync_s, "sync_per_step_s": p.sync_per_step_s, "step_s": p.step_s, "bound": p.bound,
        "engine_idle_fraction": p.engine_idle_fraction, "trainer_wait_fraction": p.trainer_wait_fraction,
        "lag_to_saturate_engines": lag_to_saturate(comps, idle_target),
        "tokens_per_s_per_gpu": tokens / p.step_s / n_total,
        "trainer_mfu_in_step": detail["trainer"]["model_flops"] / p.step_s / (
            cl.trainer_gpus * cl.gpu.peak_flops[cl.dtype]),
        "detail": detail,
    }


def best_split(w: Workload, gpu: GPUSpec, total: int, lag: int, eff: Efficiency = Efficiency(),
               tp: int = 1, pp: int = 1, engine_tp: int = 1) -> dict:
    """The trainer/engine split of ``total`` GPUs (in whole model-parallel groups) with the shortest step."""
    best = None
    unit = max(tp * pp, engine_tp)
    for trainer in range(unit, total, unit):
        engines = total - trainer
        if engines % engine_tp or trainer % (tp * pp):
            continue
        try:
            r = predict(w, Cluster(gpu, trainer, engines, tp, pp, engine_tp), lag, eff)
        except ValueError:
            continue
        if best is None or r["step_s"] < best["step_s"]:
            best = r
    if best is None:
        raise ValueError(f"no trainer/engine split of {total} GPUs fits (tp={tp}, pp={pp}, engine_tp={engine_tp})")
    return best


def scaling_curve(w: Workload, gpu: GPUSpec, totals: list[int], lag: int, eff: Efficiency = Efficiency(),
                  tp: int = 1, pp: int = 1, engine_tp: int = 1) -> list[dict]:
    """Strong scaling (fixed P, G per step) with the best split at each size; efficiency relative to the first."""
    rows = [best_split(w, gpu, n, lag, eff, tp, pp, engine_tp) for n in totals]
    base = rows[0]
    for r in rows:
        r["scaling_efficiency"] = base["step_s"] * base["gpus"] / (r["step_s"] * r["gpus"])
    return rows


# ---------------------------------------------------------------- calibration from measurements


def calibrate_mfu(w: Workload, cl: Cluster, measured_train_s: float, eff: Efficiency = Efficiency()) -> Efficiency:
    """Fit ``mfu_max`` so that :func:`trainer_step_s` reproduces a measured trainer step time (the half point is
    kept: one point fixes one parameter)."""
    probe = trainer_step_s(w, cl, dataclasses.replace(eff, mfu_max=1.0))
    fixed = probe["dp_comm_s"] + probe["optimizer_s"]
    compute_needed = (measured_train_s - fixed) / (1 + probe["bubble_fraction"])
    if compute_needed <= 0:
        raise ValueError(f"measured trainer step {measured_train_s:.3g} s is below the communication + optimizer "
                         f"floor {fixed:.3g} s of the model")
    return dataclasses.replace(eff, mfu_max=probe["compute_s"] / compute_needed)


def calibrate_generation(w: Workload, cl: Cluster, samples: int, measured_gen_s: float,
                         eff: Efficiency = Efficiency()) -> Efficiency:
    """Fit the decode efficiencies to a measured generation time. Both (memory and compute) scale by the same factor,
    so the point reproduces whichever roofline bounds it and the memory/compute balance of the model is kept."""
    scale = generation_s(w, cl, eff, samples)["gen_s"] / measured_gen_s
    return dataclasses.replace(eff, gen_mem_eff=eff.gen_mem_eff * scale, gen_compute_eff=eff.gen_compute_eff * scale)


def calibrate_sync(w: Workload, cl: Cluster, measured_sync_s: float, eff: Efficiency = Efficiency()) -> Efficiency:
    """Fit the sync bandwidth efficiency (latency kept) to a measured sync time."""
    probe = sync_s(w, cl, dataclasses.replace(eff, sync_bw_eff=1.0))
    bw_part = probe["sync_s"] - eff.sync_latency_s - probe["load_s"]
    need = measured_sync_s - eff.sync_latency_s - probe["load_s"]
    if need <= 0:
        raise ValueError(f"measured sync {measured_sync_s:.3g} s is below the model's latency + load floor")
    return dataclasses.replace(eff, sync_bw_eff=bw_part / need)


# ---------------------------------------------------------------- this machine: measured rates


@dataclasses.dataclass(frozen=True)
class MeasuredRates:
    """Rates measured on this machine (``oapl-profile scaling`` / ``run``), the CPU model's calibration points.

    ``train_tokens_per_s``: trainer-only tokens/s at each world size (a strong-scaling table);
    ``gen_tokens_per_s``: one engine's generated tokens/s while busy; ``sync_s``: one weight sync;
    ``cores``: processors the loop's processes share; ``gen_cores``: cores one engine keeps busy."""

    train_tokens_per_s: dict  # world size → tokens/s (prompt + response tokens)
    gen_tokens_per_s: float
    sync_s: float
    cores: float
    gen_cores: float = 1.0
    engines: int = 1


def measured_components(rates: MeasuredRates, world: int, train_tokens_per_step: float,
                        gen_tokens_per_step: float) -> Components:
    if world not in rates.train_tokens_per_s:
        raise ValueError(f"no measured trainer rate for world size {world} (have {sorted(rates.train_tokens_per_s)})")
    train = train_tokens_per_step / rates.train_tokens_per_s[world]
    gen = gen_tokens_per_step / (rates.gen_tokens_per_s * rates.engines)
    return Components(train, gen, rates.sync_s, cores=rates.cores, train_cores=min(world, rates.cores),
                      gen_cores=rates.gen_cores * rates.engines)
