"""Process-group bootstrap for the trainer: the one place that sets megatron-core's ``parallel_state`` up.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment) every rank
calls :func:`init_distributed`; a plain single process (no torchrun variables) becomes a world of one through a
private TCP store on a free local port. Everything after set-up receives the returned :class:`ParallelContext`
instead of reading megatron's globals::

    from oapl_megatron.config.schema import ParallelConfig
    from oapl_megatron.parallel.bootstrap import init_distributed, set_model_parallel, shutdown

    ctx = init_distributed(ParallelConfig(tp=2, pp=2), seed=1234)   # every rank, same arguments
    ...
    ctx = set_model_parallel(tp=1, pp=2, vpp=2)                      # re-grid the same world (tests)
    shutdown()

On a machine without CUDA it applies :func:`oapl_megatron.parallel.cpu_compat.apply_cpu_compat` and uses gloo;
with CUDA it pins ``cuda:LOCAL_RANK`` and uses nccl (``parallel.backend`` can force either).
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from oapl_megatron.config.loader import ConfigError
from oapl_megatron.config.schema import ParallelConfig
from oapl_megatron.parallel.rng import seed_host_rngs

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the (dp, pp, tp) grid. Megatron's order is tp fastest, then dp, then pp."""

    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    backend: str

    @property
    def num_chunks(self) -> int:
        """Model chunks held by this rank: ``vpp`` with interleaving, else 1."""
        return self.vpp or 1

    def is_first_stage(self, vp_stage: int | None = None) -> bool:
        """Whether this rank (chunk ``vp_stage`` with VPP) holds the embedding, i.e. the first pipeline stage."""
        return self.pp_rank == 0 and (vp_stage is None or vp_stage == 0)

    def is_last_stage(self, vp_stage: int | None = None) -> bool:
        """Whether this rank (chunk ``vp_stage`` with VPP) holds the output layer, i.e. the last pipeline stage."""
        return self.pp_rank == self.pp - 1 and (vp_stage is None or vp_stage == self.num_chunks - 1)


_state: dict = {}  # seed, backend, device, local_rank, timeout of the live world


def _read_env() -> tuple[int, int, int, bool]:
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if not present:
        return 0, 1, 0, False
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"partial torchrun environment: {present} set but {missing} missing; launch with torchrun or unset them"
        )
    try:
        rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as exc:
        raise RuntimeError(f"torchrun environment RANK/WORLD_SIZE/LOCAL_RANK is not an integer: {exc}") from None
    return rank, world, local, True


def _check_grid(world_size: int, tp: int, pp: int, vpp: int | None) -> None:
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {tp} * {pp} = {tp * pp}; "
            f"choose parallel.tp and parallel.pp whose product divides the number of trainer ranks"
        )
    if vpp is not None and pp < 2:
        raise ConfigError(f"parallel.vpp={vpp} needs parallel.pp >= 2 (got parallel.pp={pp})")


def _make_context(tp: int, pp: int, vpp: int | None) -> ParallelContext:
    from megatron.core import parallel_state as ps

    return ParallelContext(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=_state["local_rank"],
        tp=tp,
        pp=pp,
        dp=ps.get_data_parallel_world_size(),
        vpp=vpp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=_state["device"],
        backend=_state["backend"],
    )


def _init_model_parallel(tp: int, pp: int, vpp: int | None) -> ParallelContext:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        distributed_timeout_minutes=_state["timeout_s"] / 60.0,
    )
    seed = _state["seed"]
    # Same seed on every rank: the CPU/host generators are equal everywhere, which megatron's CPU weight
    # initialisation relies on (every TP rank builds the full master weight and keeps its shard). The tracker
    # then gives TP-region dropout a per-TP-rank stream (seed + 2718 + tp_rank).
    seed_host_rngs(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return _make_context(tp, pp, vpp)


def init_distributed(parallel: ParallelConfig, seed: int) -> ParallelContext:
    """Initialise torch.distributed and megatron's model-parallel groups; every rank calls it with equal arguments.

    Collective: all ``WORLD_SIZE`` ranks must call it (``init_process_group`` waits for all of them, up to
    ``parallel.timeout_s``). Raises :class:`ConfigError` naming ``parallel.tp``/``parallel.pp`` when the world
    size is not a multiple of ``tp * pp``.
    """
    rank, world_size, local_rank, under_torchrun = _read_env()
    _check_grid(world_size, parallel.tp, parallel.pp, parallel.vpp)
    if dist.is_initialized():
        raise RuntimeError("init_distributed: torch.distributed is already initialised; call shutdown() first")

    has_cuda = torch.cuda.is_available()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if has_cuda else "gloo")
    if backend == "nccl" and not has_cuda:
        raise ConfigError("parallel.backend=nccl needs CUDA and this machine has none; use parallel.backend=gloo")
    if has_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from oapl_megatron.parallel.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
        device = torch.device("cpu")

    timeout = timedelta(seconds=parallel.timeout_s)
    if under_torchrun:
        dist.init_process_group(backend=backend, timeout=timeout)  # env:// rendezvous from torchrun
    else:
        # A world of one: a private store on a free port (port 0 lets the OS pick), so no env vars are touched.
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)

    _state.update(seed=seed, backend=backend, device=device, local_rank=local_rank, timeout_s=parallel.timeout_s)
    return _init_model_parallel(parallel.tp, parallel.pp, parallel.vpp)


def set_model_parallel(tp: int, pp: int, vpp: int | None = None) -> ParallelContext:
    """Destroy and re-create only megatron's model-parallel groups in the live world; returns the new context.

    Collective: every rank of the world calls it with equal arguments (group creation is collective). RNG streams
    are re-seeded with the seed given to :func:`init_distributed`, so a model built after this call is initialised
    exactly as in a fresh process with the same layout.
    """
    if not dist.is_initialized() or not _state:
        raise RuntimeError("set_model_parallel: call init_distributed() first")
    from megatron.core import parallel_state as ps

    _check_grid(dist.get_world_size(), tp, pp, vpp)
    dist.barrier()
    ps.destroy_model_parallel()
    return _init_model_parallel(tp, pp, vpp)


def shutdown() -> None:
    """Tear down megatron's groups and the default process group (safe to call when nothing is initialised)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _state.clear()
