"""Wrap the policy in megatron DDP and build the (distributed) AdamW optimizer and its LR schedule.

Order (one place, as in torchtitan's parallelize): [Float16Module for bf16] → DDP per virtual-pipeline chunk →
optimizer over the DDP chunks → warmup + cosine scheduler. The loss of a step is already divided by the *global*
number of sequences (or tokens), so gradients are summed over DP, never averaged: ``calculate_per_token_loss=True``
makes megatron's DDP sum, and our finalize function never rescales by a token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from oapl_megatron.config.schema import OptimConfig


@dataclass
class TrainState:
    """What the train step needs of the model side, built once."""

    chunks: list  # DDP-wrapped model chunks (one per virtual-pipeline stage)
    optimizer: object  # megatron MegatronOptimizer
    scheduler: object  # megatron OptimizerParamScheduler
    skipped_steps: int = 0  # steps skipped because the loss or a gradient was not finite


def _finalize_without_token_scaling(model, num_tokens, *args, finalize=None, **kwargs):
    # The schedule passes the summed num_tokens when calculate_per_token_loss is on; our losses carry their own
    # global denominators, so drop it (scaling again would divide twice).
    return finalize(model, None, *args, **kwargs)


def wrap_and_build_optimizer(chunks: list, optim: OptimConfig, total_steps: int, bf16: bool) -> TrainState:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    tcfg = chunks[0].config
    tcfg.calculate_per_token_loss = True
    if bf16:
        chunks = [Float16Module(tcfg, c) for c in chunks]
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=optim.distributed,
        check_for_nan_in_grad=False,  # non-finite steps are skipped by the train step, not raised
    )
    ddp_chunks = [
        DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=c, disable_bucketing=(i > 0))
        for i, c in enumerate(chunks)
    ]
    for c in ddp_chunks:
        c.broadcast_params()  # identical replicas across DP from the first step
    tcfg.no_sync_func = [c.no_sync for c in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync
    tcfg.finalize_model_grads_func = partial(_finalize_without_token_scaling, finalize=finalize_model_grads)

    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.lr * optim.scheduler.min_lr_ratio,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        use_distributed_optimizer=optim.distributed,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        decoupled_weight_decay=True,
    )
    optimizer = get_megatron_optimizer(ocfg, ddp_chunks)
    decay = optim.scheduler.decay_steps or total_steps
    warmup = optim.scheduler.warmup_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.lr * optim.scheduler.min_lr_ratio,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(decay, 1),
        wd_incr_style="constant",
    )
    return TrainState(ddp_chunks, optimizer, scheduler)


def grads_are_finite(chunks: list, group=None) -> bool:
    """True when every gradient on every rank is finite. One all-reduce (MAX) of a flag over ``group`` (default:
    the world), so all ranks agree on skipping a step."""
    bad = torch.zeros(1, dtype=torch.float32)
    for c in chunks:
        for p in c.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None and not torch.isfinite(g).all():
                bad.fill_(1.0)
                break
    if torch.distributed.is_initialized():
        # on the parameters' device, which is the device of the trainer's process groups (cuda with NCCL)
        bad = bad.to(next((p.device for c in chunks for p in c.parameters()), torch.device("cpu")))
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX, group=group)
    return bad.item() == 0.0
