"""Save a checkpoint over the trainer's ranks (collective), or the model alone (for ``oapl-convert``)."""

from __future__ import annotations

import os
from pathlib import Path

from oapl_megatron.parallel.bootstrap import ParallelContext
from oapl_megatron.trainer.checkpoint import collective as C
from oapl_megatron.trainer.checkpoint.commit import (
    PhaseHook,
    commit,
    file_entries,
    list_files,
    make_manifest,
    prepare_tmp,
    tmp_dir,
)
from oapl_megatron.trainer.checkpoint.layout import MODEL_OPTIM, CheckpointError, checkpoint_dir
from oapl_megatron.trainer.checkpoint.state import (
    rng_state,
    sharded_model_state,
    sharded_train_state,
    sidecar_for,
    torch_save,
    write_rank0_files,
)
from oapl_megatron.trainer.optimizer import TrainState


def save_checkpoint(root: str | os.PathLike, step: int, state: TrainState, ctx: ParallelContext, extra: dict,
                    keep_last: int, hf_dir: str | os.PathLike, config=None, checksum: bool = True,
                    on_phase: PhaseHook | None = None) -> Path:
    """Write ``root/step_{step:08d}`` atomically and keep the newest ``keep_last`` complete checkpoints.

    Collective over every trainer rank (same ``root``/``step``/``keep_last``; ``extra``, ``config`` and
    ``hf_dir`` are taken from rank 0). ``hf_dir``: the HF directory the policy was built from (its config and
    tokenizer files go into ``hf/`` and its architecture into the sidecar, so ``oapl-convert`` reads the
    checkpoint as it is). Sequence: rank 0
    creates the temp dir → all ranks agree → dist_checkpointing save of model + optimizer (collective) → every
    rank writes its RNG file, rank 0 the scheduler/extra/config/meta/sidecar/hf files → all agree → each rank
    fsyncs and checksums its share of the files → rank 0 writes ``COMPLETE``, renames the temp dir into place
    and prunes → all agree. Every wait is bounded by the world's timeout. ``checksum=False`` records sizes only
    (skips reading the files back for CRC-32). ``on_phase(phase)`` is called at each of
    :data:`~oapl_megatron.trainer.checkpoint.commit.PHASES` (tests stop a save there). Returns the checkpoint
    path on every rank.
    """
    from megatron.core import dist_checkpointing

    if step < 0 or keep_last < 1:
        raise CheckpointError(f"save_checkpoint: step={step} must be >= 0 and keep_last={keep_last} >= 1")
    root = Path(root)
    rank, _ = C.world()
    tmp = tmp_dir(root, step)

    err = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _, err = C.capture(prepare_tmp, root, step, (MODEL_OPTIM, "rng"))
    C.agree(f"checkpoint step {step}: creating {tmp}", err)

    try:
        dist_checkpointing.save(sharded_train_state(state, is_loading=False), str(tmp / MODEL_OPTIM))
    except Exception as exc:
        raise CheckpointError(f"rank {rank}: dist_checkpointing save into {tmp / MODEL_OPTIM} failed: {exc}") \
            from exc
    if on_phase is not None:
        on_phase("after_model_optim")

    rng = rng_state(ctx)
    coords = C.all_gather(rng["coords"])
    _, err = C.capture(torch_save, rng, tmp / "rng" / f"rank{rank}.pt")
    if rank == 0 and err is None:
        def _rank0():
            sidecar = sidecar_for(state.chunks, ctx, hf_dir)
            write_rank0_files(tmp, step, state, ctx, extra, config, coords, sidecar, hf_dir)

        _, err = C.capture(_rank0)
    C.agree(f"checkpoint step {step}: writing {tmp}", err)

    files, err = C.capture(lambda: file_entries(tmp, C.my_share(list_files(tmp)), checksum))
    C.agree(f"checkpoint step {step}: checksumming {tmp}", err)
    shares = C.all_gather(files)

    err = None
    if rank == 0:
        manifest = make_manifest("training", step, {k: v for share in shares for k, v in share.items()})
        _, err = C.capture(commit, root, step, manifest, keep_last, on_phase)
    C.agree(f"checkpoint step {step}: committing {tmp}", err)
    return checkpoint_dir(root, step)


def save_model_state(chunks: list, path: str | os.PathLike) -> None:
    """Collective over the world: dist_checkpointing save of the model chunks alone into ``path/model_optim``.

    For ``oapl-convert``, which writes the sidecar and hf/ itself and then seals the directory
    (:func:`~oapl_megatron.trainer.checkpoint.commit.seal`) from the launching process."""
    from megatron.core import dist_checkpointing

    directory = Path(path) / MODEL_OPTIM
    if C.world()[0] == 0:
        directory.mkdir(parents=True, exist_ok=True)
    C.barrier(f"creating {directory}")
    dist_checkpointing.save(sharded_model_state(chunks), str(directory))
