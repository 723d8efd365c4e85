"""What a checkpoint holds and how each piece is taken from and put back into the live trainer.

* model and optimizer: one megatron ``dist_checkpointing`` state dict ``{"model" | "model{i}": chunk sharded
  state, "optimizer": optimizer sharded state}``, both built with
  ``metadata={"distrib_optim_sharding_type": "dp_reshardable"}`` (the only format that saves the distributed
  optimizer's Adam state on CPU with the torch-Adam fallback; it reshards over DP, not over TP/PP). The model
  part alone (:func:`sharded_model_state`) loads at any layout: its keys are global.
* scheduler and skipped-step counter (``trainer_state.pt``), the caller's ``extra`` dict (``extra.pt``), the
  resolved run config (``config.json``), ``meta.json`` (step, layout, RNG coordinates, library versions).
* RNG of every rank (``rng/rank{R}.pt``): the host generators (:mod:`oapl_megatron.parallel.rng`) and megatron's
  TP RNG-tracker states, with the rank's (tp, pp, dp) coordinates.
* the model sidecar (:func:`sidecar_for`) and the HF side files, which make the checkpoint convertible.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import time
from pathlib import Path

import torch

from oapl_megatron.parallel.bootstrap import ParallelContext
from oapl_megatron.parallel.rng import derived_seed, host_rng_state, seed_host_rngs, set_host_rng_state
from oapl_megatron.trainer.checkpoint.commit import write_json
from oapl_megatron.trainer.checkpoint.layout import (
    FORMAT_VERSION,
    HF_SUBDIR,
    SIDECAR,
    CheckpointError,
    copy_hf_side_files,
    model_sidecar,
)
from oapl_megatron.trainer.optimizer import TrainState

# dp_reshardable: the distributed optimizer's buffers are saved as they are laid out (per bucket), resharded on
# load over DP only. Given to the model's and the optimizer's sharded_state_dict alike (the trainer's and the
# converter's model state are built the same way, so both load each other's model keys).
_SHARDING_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    from oapl_megatron.models.hf_io import unwrap

    return unwrap(chunk)


def model_keys(chunks: list) -> list[str]:
    """``["model"]`` for one chunk, ``["model0", "model1", ...]`` with virtual pipeline chunks."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def sharded_model_state(chunks: list) -> dict:
    """``{"model" | "model{i}": sharded state dict}`` of the (possibly DDP/Float16-wrapped) chunks."""
    return {key: _unwrap(c).sharded_state_dict(metadata=dict(_SHARDING_METADATA))
            for key, c in zip(model_keys(chunks), chunks)}


def sharded_train_state(state: TrainState, is_loading: bool) -> dict:
    """The model state plus ``"optimizer"``: the optimizer's sharded state (dp_reshardable)."""
    sd = sharded_model_state(state.chunks)
    sd["optimizer"] = state.optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                         metadata=dict(_SHARDING_METADATA))
    return sd


def load_model_into(chunks: list, loaded: dict) -> None:
    """Copy a loaded model state (from :func:`sharded_model_state` keys) into the chunks, strictly."""
    with torch.no_grad():
        for key, chunk in zip(model_keys(chunks), chunks):
            _unwrap(chunk).load_state_dict(loaded[key], strict=True)


# ------------------------------------------------------------------------------------------------------ sidecar


def sidecar_for(chunks: list, ctx: ParallelContext, hf_dir: str | os.PathLike) -> dict:
    """The model sidecar of live chunks built from the HF directory ``hf_dir`` (layer spec and dtype as built)."""
    from oapl_megatron.models.hf_config import arch_from_hf

    tcfg = _unwrap(chunks[0]).config
    dtype = str(tcfg.params_dtype).removeprefix("torch.")
    return model_sidecar(arch_from_hf(hf_dir), ctx.tp, ctx.pp, ctx.vpp, tcfg.transformer_impl, dtype, hf_dir)


# ---------------------------------------------------------------------------------------------------------- RNG


def rng_state(ctx: ParallelContext) -> dict:
    """This rank's RNG: host generators, megatron's TP-tracker states and the rank's (tp, pp, dp) coordinates."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    # On CPU megatron's "CUDA" RNG is the CPU generator (cpu_compat), which host_rng_state() saves already.
    return {"coords": (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank), "host": host_rng_state(),
            "tracker": {name: s.clone() for name, s in tracker.items()}}


def restore_rng(tracker_src: dict, host_src: dict | None, step: int, ctx: ParallelContext) -> None:
    """Restore the tracker from ``tracker_src`` and the host RNGs from ``host_src``, or seed them if None.

    None: a DP rank that did not exist when the checkpoint was written; it is seeded deterministically from the
    step and its coordinates."""
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states({k: v.clone() for k, v in tracker_src["tracker"].items()})
    if host_src is None:
        seed_host_rngs(derived_seed("oapl-rng", f"step{step}", f"tp{ctx.tp_rank}", f"pp{ctx.pp_rank}",
                                    f"dp{ctx.dp_rank}"))
    else:
        set_host_rng_state(host_src["host"])


# ------------------------------------------------------------------------------------------- small files, layout


def torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own files: RNG tuples, loop state
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def layout_of(ctx: ParallelContext) -> dict:
    return {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "vpp": ctx.vpp}


def check_resume_layout(meta: dict, ctx: ParallelContext, path: Path) -> None:
    """CheckpointError unless the saved tp/pp/vpp equal this run's (the optimizer state reshards over DP only)."""
    saved = meta["layout"]
    if (saved["tp"], saved["pp"], saved["vpp"]) != (ctx.tp, ctx.pp, ctx.vpp):
        raise CheckpointError(
            f"{path}: saved at tp={saved['tp']} pp={saved['pp']} vpp={saved['vpp']}, this run is tp={ctx.tp} "
            f"pp={ctx.pp} vpp={ctx.vpp}; the optimizer state (dp_reshardable) reshards over DP only. Resume with "
            f"the same parallel.tp/pp/vpp (any DP size), or convert the model alone (oapl-convert reshard)"
        )


def _versions() -> dict:
    out = {"torch": torch.__version__}
    try:
        out["megatron_core"] = md.version("megatron-core")
    except md.PackageNotFoundError:
        out["megatron_core"] = "unknown"
    return out


def write_rank0_files(tmp: Path, step: int, state: TrainState, ctx: ParallelContext, extra: dict, config,
                      rng_coords: list, sidecar: dict, hf_dir) -> None:
    """trainer_state.pt, extra.pt, config.json (when given), meta.json, the sidecar and hf/ (rank 0)."""
    torch_save({"scheduler": state.scheduler.state_dict(), "skipped_steps": state.skipped_steps},
               tmp / "trainer_state.pt")
    try:
        torch_save(extra, tmp / "extra.pt")
    except Exception as exc:
        raise CheckpointError(f"extra (the caller's state dict) cannot be pickled into {tmp / 'extra.pt'}: {exc}") \
            from None
    if config is not None:
        cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
        write_json(cfg, tmp / "config.json")
    write_json({"format_version": FORMAT_VERSION, "step": step, "layout": layout_of(ctx),
                "rng_coords": {str(r): list(c) for r, c in enumerate(rng_coords)}, "versions": _versions(),
                "saved_at_unix": time.time()}, tmp / "meta.json")
    copy_hf_side_files(hf_dir, tmp / HF_SUBDIR)
    write_json(sidecar, tmp / SIDECAR)


def read_rank_files(path: Path, ctx: ParallelContext, meta: dict) -> tuple[dict, dict, dict | None, dict]:
    """(trainer_state, tracker source, host-RNG source or None, extra) for this rank."""
    trainer_state = torch_load(path / "trainer_state.pt")
    extra = torch_load(path / "extra.pt")
    saved_coords = {tuple(c): int(r) for r, c in meta["rng_coords"].items()}
    mine = (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank)
    if mine in saved_coords:
        src = torch_load(path / "rng" / f"rank{saved_coords[mine]}.pt")
        return trainer_state, src, src, extra
    # A DP rank that did not exist: the TP-region tracker streams are the same on every DP replica (megatron
    # seeds them by tp_rank only), so take them from DP rank 0 at the same (tp, pp); host RNGs are seeded.
    src = torch_load(path / "rng" / f"rank{saved_coords[(ctx.tp_rank, ctx.pp_rank, 0)]}.pt")
    return trainer_state, src, None, extra
