"""The commit protocol of a checkpoint directory: temp dir → manifest with sizes and CRC-32 → one atomic rename.

Filesystem only (no torch, no process group); :mod:`.save` runs it over the trainer's ranks, ``oapl-convert``
seals its output with :func:`seal`.

Why a crash at any point is safe: everything, the ``COMPLETE`` manifest included, is written into
``root/.tmp_step_{step:08d}``, each file fsync'ed; then one ``rename`` to ``step_{step:08d}`` (the commit point)
and an fsync of ``root``. Before the rename only a ``.tmp_*`` dir exists, which :func:`latest_checkpoint` ignores
(and deletes when asked to); after it, the new checkpoint is complete. Old checkpoints are pruned only after the
rename, oldest first, each first renamed to ``.tmp_delete_*`` so that a crash mid-deletion never leaves a
half-deleted dir that looks complete. The manifest lets a reader detect a file truncated or corrupted later (size
and CRC-32), naming the file.

A root holds one run: whoever calls :func:`latest_checkpoint` with ``cleanup`` deletes every temp dir in it, so
call it when no save is in progress on that root (a converter reading a live run passes ``cleanup=False``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

from oapl_megatron.trainer.checkpoint.layout import (
    FORMAT_VERSION,
    KINDS,
    MARKER,
    CheckpointError,
    check_format_version,
    checkpoint_dir,
)

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp_"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_CRC_CHUNK = 16 * 2**20

# The points of a save at which ``on_phase(phase)`` is called (tests stop a save there): "after_model_optim"
# (model and optimizer written, nothing else; every rank) and "before_commit" (everything including COMPLETE
# written and fsync'ed, not yet renamed; the committing rank).
PHASES = ("after_model_optim", "before_commit")
PhaseHook = Callable[[str], None]


def tmp_dir(root: Path, step: int) -> Path:
    """Where the save of ``step`` is written before the commit: ``root/.tmp_step_{step:08d}``."""
    return root / f"{TMP_PREFIX}{checkpoint_dir(root, step).name}"


# ---------------------------------------------------------------------------------------------------------- files


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(obj, path: Path) -> None:
    """Write and fsync a JSON file (non-JSON values as ``str``)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


def crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def list_files(directory: Path) -> list[str]:
    """Every regular file under ``directory``, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def file_entries(directory: Path, names: Iterable[str], checksum: bool) -> dict:
    """fsync each named file and return its manifest entry ``{size, crc32}`` (crc32 None without ``checksum``)."""
    out = {}
    for name in names:
        path = directory / name
        fsync_file(path)
        out[name] = {"size": path.stat().st_size, "crc32": crc32(path) if checksum else None}
    return out


def make_manifest(kind: str, step: int | None, files: dict) -> dict:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {"format_version": FORMAT_VERSION, "kind": kind, "step": step, "files": dict(sorted(files.items()))}


def _write_marker(directory: Path, manifest: dict) -> None:
    """Write ``COMPLETE`` and fsync every directory under ``directory`` (bottom-up), so the tree is durable."""
    write_json(manifest, directory / MARKER)
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        fsync_dir(sub)
    fsync_dir(directory)


# --------------------------------------------------------------------------------------------------------- write


def prepare_tmp(root: Path, step: int, subdirs: Iterable[str]) -> Path:
    """Create an empty temp dir (with ``subdirs``) for the save of ``step``; refuse if the step is committed."""
    final = checkpoint_dir(root, step)
    if final.exists():
        raise CheckpointError(f"{final} already exists; a step is saved once (refusing to replace a checkpoint)")
    tmp = tmp_dir(root, step)
    if tmp.exists():  # a crashed earlier attempt at this step
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for sub in subdirs:
        (tmp / sub).mkdir(parents=True)
    fsync_dir(root)
    return tmp


def commit(root: Path, step: int, manifest: dict, keep_last: int, on_phase: PhaseHook | None = None) -> Path:
    """Write the manifest into the temp dir, rename it into place (the commit point), prune old checkpoints.

    Called by one process (the trainer's rank 0) after every file of the temp dir is written and fsync'ed."""
    tmp = tmp_dir(root, step)
    _write_marker(tmp, manifest)
    if on_phase is not None:
        on_phase("before_commit")
    final = checkpoint_dir(root, step)
    os.rename(tmp, final)
    fsync_dir(root)
    try:
        _prune(root, keep_last, newest=final)
    except OSError as exc:  # the new checkpoint is committed; a failed deletion must not fail the save
        logger.warning("checkpoint %s saved, but pruning older checkpoints failed: %s", final, exc)
    return final


def seal(directory: Path, kind: str, step: int | None = None) -> dict:
    """Checksum every file of a finished ``directory`` and write its ``COMPLETE`` manifest last (one process).

    For a directory written in place (``oapl-convert --out``): until ``COMPLETE`` exists, readers refuse it."""
    directory = Path(directory)
    if (directory / MARKER).exists():
        raise CheckpointError(f"{directory / MARKER} exists already; refusing to seal a directory twice")
    manifest = make_manifest(kind, step, file_entries(directory, list_files(directory), checksum=True))
    _write_marker(directory, manifest)
    return manifest


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    out = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if not m or not p.is_dir():
            continue
        try:
            manifest = json.loads((p / MARKER).read_text())
        except (OSError, ValueError):
            continue  # no or unreadable marker: not a complete checkpoint
        if manifest.get("step") == int(m.group(1)):
            out.append((int(m.group(1)), p))
    return sorted(out)


def _prune(root: Path, keep_last: int, newest: Path) -> None:
    complete = _complete_checkpoints(root)
    doomed = [p for _, p in complete[: max(0, len(complete) - keep_last)] if p != newest]
    for p in doomed:
        trash = root / f"{TMP_PREFIX}delete_{p.name}"
        if trash.exists():  # left by a crash during an earlier deletion
            shutil.rmtree(trash)
        os.rename(p, trash)  # a crash during rmtree leaves a .tmp_ dir, never a half-deleted "complete" one
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------- read


def latest_checkpoint(root: str | os.PathLike, cleanup: bool) -> Path | None:
    """The newest complete checkpoint under ``root`` (highest step with a ``COMPLETE`` of that step), or None.

    Temp dirs (``.tmp_*``: interrupted saves or deletions) are ignored, and deleted when ``cleanup``."""
    root = Path(root)
    if not root.is_dir():
        return None
    if cleanup:
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                logger.info("removing stale temporary checkpoint dir %s", p)
                shutil.rmtree(p, ignore_errors=True)
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def read_manifest(path: str | os.PathLike) -> dict:
    """The ``COMPLETE`` manifest of a checkpoint dir; CheckpointError naming the file if absent or unreadable."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{marker} is missing: {path} is not a complete checkpoint (interrupted save?)")
    try:
        manifest = json.loads(marker.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{marker} is not valid JSON ({exc})") from None
    check_format_version(manifest.get("format_version"), marker)
    if manifest.get("kind") not in KINDS:
        raise CheckpointError(f"{marker}: kind {manifest.get('kind')!r} is not one of {KINDS}")
    return manifest


def validate_files(path: Path, manifest: dict, crc_names: Iterable[str] = ()) -> None:
    """Every manifest file exists with its size (cheap); the files in ``crc_names`` also match their CRC-32."""
    files = manifest["files"]
    for name, info in files.items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {path / MARKER})")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{p} has {size} bytes, the manifest says {info['size']} (truncated or replaced)")
    for name in crc_names:
        want = files[name].get("crc32")
        if want is not None and crc32(path / name) != want:
            raise CheckpointError(f"{path / name} is corrupted (CRC-32 differs from {path / MARKER})")
