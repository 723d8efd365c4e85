"""One optimizer step of the policy through megatron's pipeline schedule, and forward-only log-prob passes.

Collective contract: every rank of the trainer world calls :func:`train_step` (and :func:`forward_logprobs`) with
the same step size; inside, megatron runs the pipeline schedule over this rank's micro-batches (P2P with its
neighbour stages, TP all-reduces, DP gradient reduction in ``finalize_model_grads``), then one world all-reduce of
the metrics and one of the finiteness flag. Every collective is bounded by the process-group timeout given at
``init_distributed`` (``parallel.timeout_s``).

The loss of each micro-batch is divided by the step's global denominator (sequences for OAPL and sequence-level
GRPO, response tokens for token-level GRPO/TIS), so micro-batching, DP and PP all produce the gradient of one big
batch. Non-finite losses or gradients skip the optimizer step on every rank and are counted.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from oapl_megatron.algo import grpo_loss, oapl_sequence_loss
from oapl_megatron.config.schema import GRPOObjective, OAPLObjective
from oapl_megatron.parallel.bootstrap import ParallelContext
from oapl_megatron.trainer.batch import MicroBatch, StepBatch
from oapl_megatron.trainer.logprobs import token_logprobs_and_entropy
from oapl_megatron.trainer.optimizer import TrainState, grads_are_finite

# Summed over micro-batches and DP ranks, then turned into means in _finish_metrics.
_SUM_KEYS = ("loss", "sq_residual", "log_ratio", "adv_abs", "kl_k1", "kl_k2", "clip_frac", "ratio_mean",
             "entropy_sum", "tokens", "sequences", "logp_sum")


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """megatron convention: True = masked out. [1, 1, S, S]. Right padding needs nothing more (causal)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def _vocab_slice(ctx: ParallelContext, padded_vocab: int) -> int:
    return ctx.tp_rank * (padded_vocab // ctx.tp)


def _forward(model, mb: MicroBatch, mask: torch.Tensor):
    return model(mb.tokens, mb.position_ids, attention_mask=mask)


def _token_stats(logits: torch.Tensor, mb: MicroBatch, ctx: ParallelContext, vocab_size: int, padded_vocab: int,
                 tp_group):
    # logits: [B, S, V/tp] in the model's dtype; chunked over tokens, fp32 inside
    return token_logprobs_and_entropy(logits, mb.targets, vocab_size, _vocab_slice(ctx, padded_vocab),
                                      tp_group)  # [B, S] each


def _objective_loss(objective, tok_logp: torch.Tensor, mb: MicroBatch, batch: StepBatch):
    mask = mb.mask  # [B, S]
    if isinstance(objective, OAPLObjective):
        logp_seq = (tok_logp * mask).sum(dim=1)  # [B] sequence-level sums, no length normalisation (paper)
        return oapl_sequence_loss(logp_seq, mb.ref_logp, mb.advantage, objective.beta2,
                                  denom=batch.num_sequences, mask=mb.valid.bool())
    assert isinstance(objective, GRPOObjective)
    return grpo_loss(tok_logp, mb.ref_token_logp, mask.bool(), mb.advantage, ratio=objective.ratio,
                     clip_eps=objective.clip_eps, tis_cap=objective.tis_cap,
                     num_tokens=batch.num_tokens, num_sequences=batch.num_sequences)


def _loss_func(mb: MicroBatch, batch: StepBatch, objective, ctx, vocab_size, padded_vocab, tp_group, logits):
    tok_logp, entropy = _token_stats(logits, mb, ctx, vocab_size, padded_vocab, tp_group)
    loss, m = _objective_loss(objective, tok_logp, mb, batch)
    n_valid = mb.valid.sum()
    stats = {
        "loss": loss.detach(),
        "entropy_sum": (entropy * mb.mask).sum(),
        "tokens": mb.mask.sum(),
        "sequences": n_valid,
        "logp_sum": (tok_logp.detach() * mb.mask).sum(),
    }
    # per-call means from the objective → sums weighted by this call's sequence count
    for k in ("sq_residual", "log_ratio", "adv_abs", "kl_k1", "kl_k2", "clip_frac", "ratio_mean"):
        if k in m:
            stats[k] = m[k].detach().float() * n_valid
    # megatron: (loss, num_tokens, reduced); num_tokens is ignored by our finalize (global denominators)
    return loss, torch.ones((), dtype=torch.int), stats


def _run_schedule(state_chunks, batch: StepBatch, forward_step, forward_only: bool, ctx: ParallelContext):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    n_chunks = len(state_chunks)
    data = [iter(batch.micro_batches) for _ in range(n_chunks)] if n_chunks > 1 else iter(batch.micro_batches)
    return fb(
        forward_step_func=forward_step,
        data_iterator=data,
        model=state_chunks if n_chunks > 1 else state_chunks[0],
        num_microbatches=len(batch.micro_batches),
        seq_length=batch.seq_len,
        micro_batch_size=batch.micro_batch_size,
        forward_only=forward_only,
    )


def _reduce_stats(store: list[dict], ctx: ParallelContext) -> dict[str, float]:
    """Sum the per-micro-batch stats of the last stage over DP; every rank returns the same global sums."""
    vec = torch.zeros(len(_SUM_KEYS), dtype=torch.float64)
    if ctx.is_last_stage() and ctx.tp_rank == 0:
        for s in store:
            for i, k in enumerate(_SUM_KEYS):
                if k in s:
                    vec[i] += float(s[k])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = ctx.device
        vec = vec.to(dev)
        dist.all_reduce(vec)
        vec = vec.cpu()
    return dict(zip(_SUM_KEYS, vec.tolist()))


_OBJECTIVE_KEYS = {"oapl": ("sq_residual", "log_ratio", "adv_abs", "kl_k1", "kl_k2"),
                   "grpo": ("clip_frac", "ratio_mean", "kl_k1")}


def _finish_metrics(sums: dict[str, float], objective) -> dict[str, float]:
    seqs = max(sums["sequences"], 1.0)
    toks = max(sums["tokens"], 1.0)
    out = {"loss": sums["loss"], "entropy": sums["entropy_sum"] / toks, "response_tokens": sums["tokens"],
           "sequences": sums["sequences"], "logp_seq_mean": sums["logp_sum"] / seqs}
    for k in _OBJECTIVE_KEYS[objective.type]:
        out[k] = sums[k] / seqs
    return out


def forward_backward(state: TrainState, batch: StepBatch, objective: OAPLObjective | GRPOObjective,
                     ctx: ParallelContext, vocab_size: int, padded_vocab: int) -> dict[str, float]:
    """Zero the gradients, then forward + backward over this rank's micro-batches; gradients end reduced over DP
    (``finalize_model_grads``). Returns global metrics, identical on every rank."""
    for c in state.chunks:
        c.zero_grad_buffer()
    state.optimizer.zero_grad()
    mask = causal_mask(batch.seq_len, ctx.device)
    batch = StepBatch([mb.to(ctx.device) for mb in batch.micro_batches], batch.seq_len, batch.micro_batch_size,
                      batch.num_sequences, batch.num_tokens, batch.extra)
    tp_group = ctx.tp_group

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = _forward(model, mb, mask)
        return out, partial(_loss_func, mb, batch, objective, ctx, vocab_size, padded_vocab, tp_group)

    store = _run_schedule(state.chunks, batch, forward_step, forward_only=False, ctx=ctx)
    return _finish_metrics(_reduce_stats(store, ctx), objective)


def apply_update(state: TrainState, metrics: dict[str, float]) -> dict[str, float]:
    """The optimizer step after :func:`forward_backward`, or a counted skip when the loss or any gradient on any
    rank is not finite (the weights are then untouched). Adds grad_norm, lr, skipped, skipped_total."""
    finite = bool(torch.isfinite(torch.tensor(metrics["loss"]))) and grads_are_finite(state.chunks)
    grad_norm = None
    if finite:
        ok, grad_norm, _ = state.optimizer.step()
        finite = bool(ok) and (grad_norm is None or bool(torch.isfinite(torch.tensor(grad_norm))))
    if finite:
        state.scheduler.step(increment=1)
    else:
        state.skipped_steps += 1
        state.optimizer.zero_grad()
    metrics = dict(metrics)
    metrics["grad_norm"] = float(grad_norm) if (finite and grad_norm is not None) else float("nan")
    metrics["skipped"] = 0.0 if finite else 1.0
    metrics["skipped_total"] = float(state.skipped_steps)
    metrics["lr"] = float(state.optimizer.param_groups[0]["lr"])
    return metrics


def train_step(state: TrainState, batch: StepBatch, objective: OAPLObjective | GRPOObjective,
               ctx: ParallelContext, vocab_size: int, padded_vocab: int) -> dict[str, float]:
    """One optimizer step: :func:`forward_backward` then :func:`apply_update`."""
    return apply_update(state, forward_backward(state, batch, objective, ctx, vocab_size, padded_vocab))


@torch.no_grad()
def forward_logprobs(chunks: list, batch: StepBatch, ctx: ParallelContext, vocab_size: int,
                     padded_vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-token (log-prob, entropy) of every target position, [B, S] each per micro-batch of this rank.

    Computed on the last pipeline stage and broadcast over the pipeline group, so every rank of this DP replica
    returns the same list."""
    mask = causal_mask(batch.seq_len, ctx.device)
    mbs = [mb.to(ctx.device) for mb in batch.micro_batches]
    batch = StepBatch(mbs, batch.seq_len, batch.micro_batch_size, batch.num_sequences, batch.num_tokens)
    tp_group = ctx.tp_group

    def loss_func(mb, logits):
        tok_logp, entropy = _token_stats(logits, mb, ctx, vocab_size, padded_vocab, tp_group)
        return torch.zeros(()), torch.ones((), dtype=torch.int), {"logp": tok_logp, "entropy": entropy}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        return _forward(model, mb, mask), partial(loss_func, mb)

    for c in chunks:
        c.eval()
    try:
        store = _run_schedule(chunks, batch, forward_step, forward_only=True, ctx=ctx)
    finally:
        for c in chunks:
            c.train()
    b, s = batch.micro_batch_size, batch.seq_len
    out = []
    for i in range(len(mbs)):
        t = torch.zeros(2, b, s, dtype=torch.float32, device=ctx.device)
        if ctx.is_last_stage():
            t[0] = store[i]["logp"]
            t[1] = store[i]["entropy"]
        if ctx.pp > 1:
            dist.broadcast(t, src=ctx.pp_last_rank, group=ctx.pp_group)
        out.append((t[0].cpu(), t[1].cpu()))
    return out
