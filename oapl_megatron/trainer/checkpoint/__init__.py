"""Training checkpoints: resumable (model, distributed optimizer, LR schedule, RNG of every rank, loop state) and
directly convertible by ``oapl-convert`` (one format for the trainer and the converter).

Used by the train loop (every trainer rank calls the collectives)::

    from oapl_megatron.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    path = latest_checkpoint(root)                          # newest COMPLETE checkpoint, or None
    extra = load_checkpoint(path, state, ctx) if path else {}
    ...
    save_checkpoint(root, step, state, ctx, extra={"step": step, ...}, keep_last=3, hf_dir=cfg.model.hf_path,
                    config=cfg)

and by ``oapl-convert`` (``mcore-to-hf --ckpt root/step_00000060`` or ``--run-dir RUN``), which loads the model
part alone at any layout (:func:`load_model_state`) and writes its own output in the same format
(:func:`save_model_state`, then :func:`~.commit.seal`).

Layout of one checkpoint, ``root/step_{step:08d}/`` (the shared part is described in :mod:`.layout`)::

    oapl_checkpoint.json  model sidecar (architecture, tp/pp/vpp, layer spec, dtype)
    hf/                   HF config and tokenizer files of model.hf_path
    model_optim/          megatron dist_checkpointing of model chunks + distributed optimizer (:mod:`.state`)
    trainer_state.pt      LR scheduler state_dict and the skipped-step counter (rank 0)
    rng/rank{R}.pt        host RNG states and megatron's TP RNG-tracker states of global rank R, with R's
                          (tp, pp, dp) coordinates
    extra.pt              the caller's picklable dict, as given (the train loop saves step, policy_version and
                          prompts_consumed; the rollout buffer is not saved: a resumed run starts empty) (rank 0)
    config.json           the resolved run config, when given (rank 0)
    meta.json             format version, step, layout, RNG coordinates, library versions (rank 0)
    COMPLETE              JSON manifest {format_version, kind: "training", step, files: {path: {size, crc32}}},
                          written last

Modules, one role each: :mod:`.layout` (file names, sidecar, HF side files), :mod:`.commit` (temp dir →
manifest with CRC → atomic rename, keep-last-N, newest complete), :mod:`.collective` (bounded barriers, one shared
verdict per phase), :mod:`.state` (each piece of state, taken and restored), :mod:`.save` and :mod:`.load`.

Collective contract: :func:`save_checkpoint` and :func:`load_checkpoint` are called by every rank of the trainer
world with the same arguments (``extra``/``config``/``hf_dir`` matter on rank 0 only). Every wait is a world
collective bounded by the world's process-group timeout (``parallel.timeout_s``); with gloo the barriers are
``monitored_barrier``, so a timeout names the ranks that did not arrive. A failure on any rank (bad file, rank 0
cannot write) is shared with all ranks, so every rank raises the same :class:`CheckpointError`. The root must be
on a filesystem every trainer rank sees (as dist_checkpointing requires), and hold one run (rank 0 deletes stale
temp dirs).
"""

from oapl_megatron.trainer.checkpoint.commit import PHASES, read_manifest, seal
from oapl_megatron.trainer.checkpoint.layout import (
    FORMAT_VERSION,
    HF_SUBDIR,
    MARKER,
    MODEL_OPTIM,
    SIDECAR,
    CheckpointError,
    checkpoint_dir,
    read_sidecar,
)
from oapl_megatron.trainer.checkpoint.load import latest_checkpoint, load_checkpoint, load_model_state
from oapl_megatron.trainer.checkpoint.save import save_checkpoint, save_model_state

__all__ = ["PHASES", "FORMAT_VERSION", "HF_SUBDIR", "MARKER", "MODEL_OPTIM", "SIDECAR", "CheckpointError",
           "checkpoint_dir", "latest_checkpoint", "load_checkpoint", "load_model_state", "read_manifest",
           "read_sidecar", "save_checkpoint", "save_model_state", "seal"]
