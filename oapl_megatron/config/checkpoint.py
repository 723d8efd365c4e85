"""The ``checkpoint`` config section: where and how often the trainer writes resumable checkpoints.

Used by the train loop with :mod:`oapl_megatron.trainer.checkpoint`::

    ckpt_cfg = CheckpointConfig(every_steps=50, keep_last=3)
    root = ckpt_cfg.resolve_dir(run_dir)             # run_dir/checkpoints unless ``dir`` is set
    if ckpt_cfg.due(step):
        save_checkpoint(root, step, state, ctx, extra, keep_last=ckpt_cfg.keep_last, hf_dir=cfg.model.hf_path)
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from oapl_megatron.config.base import StrictModel


class CheckpointConfig(StrictModel):
    """Resumable training checkpoints (model, optimizer, scheduler, RNG, loop state); each one converts directly
    (``oapl-convert mcore-to-hf --run-dir RUN`` takes the newest complete one)."""

    dir: Path | None = Field(
        None, description="Checkpoint root; None = <run_dir>/checkpoints. One run per root (rank 0 cleans temp dirs)."
    )
    every_steps: int = Field(0, ge=0, le=10**7, description="Save every N optimizer steps; 0 = no periodic saves.")
    keep_last: int = Field(
        2, ge=1, le=1000, description="Complete checkpoints kept; older ones are deleted after a new one completes."
    )
    save_on_exit: bool = Field(True, description="Save once more when the run ends normally.")
    resume: bool = Field(False, description="Start from the newest complete checkpoint under the root if one exists "
                                            "(`oapl-train ... --resume` sets it).")

    def resolve_dir(self, run_dir: Path) -> Path:
        """The checkpoint root for a run directory."""
        return Path(self.dir) if self.dir is not None else Path(run_dir) / "checkpoints"

    def due(self, step: int) -> bool:
        """Whether a periodic save is due after optimizer step ``step`` (1-based count of completed steps)."""
        return self.every_steps > 0 and step > 0 and step % self.every_steps == 0
