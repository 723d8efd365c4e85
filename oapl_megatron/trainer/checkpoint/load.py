"""Find the newest complete checkpoint; load one into the trainer (collective), or its model alone (any layout)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from oapl_megatron.parallel.bootstrap import ParallelContext
from oapl_megatron.parallel.cpu_compat import materialise_fresh_adam_state, restore_adam_steps
from oapl_megatron.trainer.checkpoint import collective as C
from oapl_megatron.trainer.checkpoint import commit
from oapl_megatron.trainer.checkpoint.layout import MARKER, MODEL_OPTIM, CheckpointError
from oapl_megatron.trainer.checkpoint.state import (
    check_resume_layout,
    load_model_into,
    read_rank_files,
    restore_rng,
    sharded_model_state,
    sharded_train_state,
)
from oapl_megatron.trainer.optimizer import TrainState


def latest_checkpoint(root: str | os.PathLike, cleanup: bool | None = None) -> Path | None:
    """The newest complete checkpoint under ``root`` (highest step with a valid ``COMPLETE`` manifest), or None.

    Not a collective. Temp dirs (``.tmp_*``: interrupted saves or deletions) are ignored, and deleted when
    ``cleanup`` (default: on global rank 0 only). With cleanup, call it when no save is in progress on this root.
    """
    if cleanup is None:
        cleanup = C.world()[0] == 0
    return commit.latest_checkpoint(root, cleanup)


def load_checkpoint(path: str | os.PathLike, state: TrainState, ctx: ParallelContext,
                    checksum: bool = True) -> dict:
    """Restore model, optimizer (Adam moments and step), scheduler, skipped steps and this rank's RNG; return extra.

    Collective over every trainer rank. Checks first, before anything is modified: the manifest (a ``training``
    checkpoint), every file's size (and CRC-32, split over ranks, unless ``checksum=False``) and the layout — a
    missing, truncated or corrupted file raises CheckpointError naming it, on every rank. The DP size may differ
    from the saving run (dist_checkpointing reshards model and optimizer over DP); TP/PP/VPP must match. RNG: a
    rank whose (tp, pp, dp) coordinates existed gets its saved states; a new DP rank gets DP rank 0's TP-tracker
    states and host RNGs seeded from (step, coordinates).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    rank, _ = C.world()

    def _preflight():
        manifest = commit.read_manifest(path)
        if manifest["kind"] != "training":
            raise CheckpointError(f"{path}: a {manifest['kind']}-only checkpoint (written by oapl-convert) has no "
                                  f"optimizer, scheduler or RNG state to resume from; start a run from an HF "
                                  f"export of it (oapl-convert mcore-to-hf) as model.hf_path")
        commit.validate_files(path, manifest, C.my_share(sorted(manifest["files"])) if checksum else ())
        meta_path = path / "meta.json"
        meta = json.loads(meta_path.read_text())
        if meta.get("step") != manifest["step"]:
            raise CheckpointError(f"{meta_path}: step {meta.get('step')} differs from {path / MARKER}")
        check_resume_layout(meta, ctx, path)
        return meta, read_rank_files(path, ctx, meta)

    pre, err = C.capture(_preflight)
    C.agree(f"loading checkpoint {path}", err)
    meta, (trainer_state, tracker_src, host_src, extra) = pre

    materialise_fresh_adam_state(state.optimizer)
    sharded = sharded_train_state(state, is_loading=True)
    try:
        with torch.no_grad():
            loaded = dist_checkpointing.load(sharded, str(path / MODEL_OPTIM))
    except Exception as exc:
        raise CheckpointError(f"rank {rank}: dist_checkpointing load of {path / MODEL_OPTIM} failed: {exc}") \
            from exc

    def _apply():
        load_model_into(state.chunks, loaded)
        with torch.no_grad():
            state.optimizer.load_state_dict(loaded["optimizer"])
            try:
                restore_adam_steps(state.optimizer, loaded["optimizer"])
            except ValueError as exc:
                raise CheckpointError(f"{path / MODEL_OPTIM}: {exc}") from exc
        state.scheduler.load_state_dict(trainer_state["scheduler"])
        state.skipped_steps = int(trainer_state["skipped_steps"])
        restore_rng(tracker_src, host_src, meta["step"], ctx)

    _, err = C.capture(_apply)
    C.agree(f"restoring state from {path}", err)
    return extra


def load_model_state(chunks: list, path: str | os.PathLike) -> None:
    """Collective over the world: load the model part of checkpoint ``path`` (either kind) into ``chunks``.

    The chunks may be built at any tp/pp/vpp (dist_checkpointing reshards the model on load); the optimizer
    state of a training checkpoint is not read. The caller checks the manifest first (see ``oapl-convert``).
    """
    from megatron.core import dist_checkpointing

    with torch.no_grad():
        loaded = dist_checkpointing.load(sharded_model_state(chunks), str(Path(path) / MODEL_OPTIM))
    load_model_into(chunks, loaded)
