"""The one checkpoint format shared by the trainer and ``oapl-convert``: file names, the model sidecar, HF files.

No torch, no megatron: the converter's pre-flight checks read these without starting a process group.

A checkpoint directory (``root/step_{step:08d}/`` from the trainer, any directory from ``oapl-convert``)::

    oapl_checkpoint.json  SIDECAR: format version, the ArchSpec, the tp/pp/vpp it was written with, the layer
                          spec and params dtype; enough to build a model that loads ``model_optim/``
    hf/                   the HF config.json, generation_config.json and tokenizer files of the model's source
                          directory (no weights), so an HF export needs nothing outside the checkpoint
    model_optim/          megatron dist_checkpointing (torch_dist): {"model" | "model{i}": model chunks,
                          "optimizer": distributed optimizer (trainer checkpoints only)}; model keys are global,
                          so the model alone loads at any tp/pp/vpp
    trainer_state.pt, rng/, extra.pt, config.json, meta.json
                          the rest of the training state (trainer checkpoints only; see the package docstring)
    COMPLETE              MARKER: the manifest {format_version, kind, step, files: {path: {size, crc32}}},
                          written last (see :mod:`.commit`)

``kind`` is ``"training"`` (everything above: resumable, convertible) or ``"model"`` (``oapl-convert`` output:
sidecar, hf/, model_optim/ with the model only; convertible, not resumable).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

FORMAT_VERSION = 2
MARKER = "COMPLETE"
SIDECAR = "oapl_checkpoint.json"
MODEL_OPTIM = "model_optim"
HF_SUBDIR = "hf"
KINDS = ("training", "model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# What format 1 was, for the error a format-1 checkpoint gets (it is not read).
_FORMAT_1 = ("format 1 (before trainer and oapl-convert checkpoints shared one layout: converter output kept the "
             "model in model/ without a COMPLETE manifest, trainer checkpoints had no sidecar)")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the directory or file and the reason."""


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """``root/step_{step:08d}``."""
    return Path(root) / f"step_{step:08d}"


def check_format_version(found, path: Path) -> None:
    """CheckpointError naming ``path`` unless ``found`` is :data:`FORMAT_VERSION`."""
    if found == FORMAT_VERSION:
        return
    hint = (f"; it is {_FORMAT_1}: resume or convert it with the oapl_megatron version that wrote it, or convert "
            f"the HF model again (oapl-convert hf-to-mcore)") if found == 1 else ""
    raise CheckpointError(f"{path}: format_version {found!r}, this code reads {FORMAT_VERSION}{hint}")


def model_sidecar(arch, tp: int, pp: int, vpp: int | None, layer_spec: str, dtype: str, hf_source) -> dict:
    """The sidecar dict. ``arch``: an ArchSpec; ``layer_spec``: ``local`` | ``transformer_engine``; ``dtype``:
    ``float32`` | ``bfloat16`` (the params dtype); ``hf_source``: the HF directory the model came from (a note)."""
    return {"format_version": FORMAT_VERSION, "arch": dataclasses.asdict(arch), "tp": tp, "pp": pp, "vpp": vpp,
            "layer_spec": layer_spec, "dtype": dtype, "hf_source": str(Path(hf_source).resolve())}


def read_sidecar(ckpt_dir: str | os.PathLike) -> dict:
    """The sidecar of a checkpoint; CheckpointError naming the file if absent, unreadable or of another format."""
    path = Path(ckpt_dir) / SIDECAR
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {SIDECAR}; not a checkpoint written by oapl-convert or the trainer "
                              f"(format {FORMAT_VERSION})")
    try:
        side = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    check_format_version(side.get("format_version"), path)
    return side


def copy_hf_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy config, generation config and tokenizer files (everything but weights and weight indexes)."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: no config.json; the model's HF directory is needed for the checkpoint's hf/")
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _WEIGHT_INDEXES:
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied
