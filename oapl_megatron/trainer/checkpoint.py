"""Resumable training checkpoints: model, distributed optimizer, LR schedule, RNG of every rank, loop state.

Used by the train loop (every trainer rank calls the collectives)::

    from oapl_megatron.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    path = latest_checkpoint(root)                          # newest COMPLETE checkpoint, or None
    extra = load_checkpoint(path, state, ctx) if path else {}
    ...
    save_checkpoint(root, step, state, ctx, extra={"step": step, "cursor": ...}, keep_last=3, config=cfg)

Layout of one checkpoint, ``root/step_{step:08d}/``::

    model_optim/       megatron dist_checkpointing (torch_dist) of {"model"[i]: chunk sharded state,
                       "optimizer": optimizer sharded state}, both built with
                       ``metadata={"distrib_optim_sharding_type": "dp_reshardable"}`` (the only format that saves
                       the distributed optimizer's Adam state on CPU with the torch-Adam fallback; it reshards
                       over DP, not over TP/PP)
    trainer_state.pt   LR scheduler state_dict and the skipped-step counter (rank 0)
    rng/rank{R}.pt     python / numpy / torch CPU (and CUDA) RNG states and megatron's TP RNG-tracker states of
                       global rank R, with R's (tp, pp, dp) coordinates
    extra.pt           the loop's picklable dict (counters, data cursor, rollout buffer, metrics) (rank 0)
    config.json        the resolved run config, when given (rank 0)
    meta.json          format version, step, layout, library versions (rank 0)
    COMPLETE           JSON manifest {step, files: {relative path: {size, crc32}}}, written last

Commit protocol (why a crash at any point is safe): everything, the ``COMPLETE`` manifest included, is written
into ``root/.tmp_step_{step:08d}``, each file fsync'ed; then rank 0 renames the temp dir to ``step_{step:08d}``
(one atomic ``rename``: the commit point) and fsyncs ``root``. Before the rename only a ``.tmp_*`` dir exists,
which :func:`latest_checkpoint` ignores (and rank 0 deletes); after it, the new checkpoint is complete. Old
checkpoints are pruned only after the rename, oldest first, each first renamed to ``.tmp_delete_*`` (so a crash
mid-deletion never leaves a half-deleted dir that looks complete). The manifest also lets :func:`load_checkpoint`
detect a file truncated or corrupted later (size + CRC-32), naming the file. The root must be on a filesystem
every trainer rank sees (as dist_checkpointing requires), and hold one run (rank 0 deletes stale temp dirs).

Collective contract: :func:`save_checkpoint` and :func:`load_checkpoint` are called by every rank of the trainer
world with the same arguments (``extra``/``config`` matter on rank 0 only). Every wait is a world collective
bounded by the world's process-group timeout (``parallel.timeout_s``); with gloo the barriers are
``monitored_barrier`` so a timeout names the ranks that did not arrive. A failure on any rank (bad file, rank 0
cannot write) is shared with all ranks through one ``all_gather_object`` so every rank raises the same
:class:`CheckpointError` instead of waiting for the others until the timeout.

Test hook: ``OAPL_CHECKPOINT_TEST_PAUSE="<phase>:<step>:<signal file>"`` makes the save of ``<step>`` create the
signal file (rank 0) and sleep at ``<phase>`` (``after_model_optim``: model and optimizer written, nothing else;
``before_commit``: everything including ``COMPLETE`` written, not yet renamed) so a test can SIGKILL it mid-save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from oapl_megatron.parallel.bootstrap import ParallelContext
from oapl_megatron.parallel.cpu_compat import materialise_fresh_adam_state, restore_adam_steps
from oapl_megatron.trainer.optimizer import TrainState

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "COMPLETE"
TMP_PREFIX = ".tmp_"
MODEL_OPTIM = "model_optim"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# dp_reshardable: the distributed optimizer's buffers are saved as they are laid out (per bucket), resharded on
# load over DP only. Must be given to the model's and the optimizer's sharded_state_dict alike.
_SHARDING_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
_PAUSE_ENV = "OAPL_CHECKPOINT_TEST_PAUSE"
_CRC_CHUNK = 16 * 2**20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the directory or file and the reason."""


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """``root/step_{step:08d}``."""
    return Path(root) / f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------------------------
# Collective helpers
# ----------------------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _world_timeout() -> timedelta:
    """The default process group's timeout (the one given to init_process_group)."""
    for device in ("cpu", "cuda"):
        try:
            return dist.group.WORLD._get_backend(torch.device(device)).options._timeout
        except Exception:  # no backend for this device type, or a torch without these internals
            continue
    return dist.default_pg_timeout


def _barrier(what: str) -> None:
    """World barrier with the world's timeout; a timeout names the step and (gloo) the missing ranks."""
    rank, world = _world()
    if world == 1:
        return
    timeout = _world_timeout()
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout)
        else:
            dist.barrier()
    except RuntimeError as exc:
        raise CheckpointError(f"rank {rank}: barrier '{what}' failed after up to {timeout}: {exc}") from exc


def _agree(what: str, error: str | None) -> None:
    """Share each rank's error (None = fine) with every rank; raise the same CheckpointError everywhere if any.

    A monitored barrier first (gloo: a rank that never arrives, e.g. because it died, is named), then one
    all_gather_object over the world; both bounded by the world's timeout."""
    rank, world = _world()
    if world == 1:
        errors = [error]
    else:
        _barrier(what)
        errors = [None] * world
        dist.all_gather_object(errors, error)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        lines = "\n".join(f"  rank {r}: {e}" for r, e in bad)
        raise CheckpointError(f"{what} failed on {len(bad)} of {world} ranks:\n{lines}")


def _capture(fn, *args, **kwargs) -> tuple[Any, str | None]:
    """Run ``fn``; return (result, None) or (None, "Type: message") so the error can be shared collectively."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # shared with all ranks by _agree, which raises
        return None, f"{type(exc).__name__}: {exc}"


def _test_pause(phase: str, step: int) -> None:
    """Test hook (see the module docstring); a no-op unless the environment variable names this phase and step."""
    spec = os.environ.get(_PAUSE_ENV)
    if not spec:
        return
    want_phase, want_step, signal_file = spec.split(":", 2)
    if want_phase != phase or int(want_step) != step:
        return
    if _world()[0] == 0:
        Path(signal_file).write_text(phase)
    time.sleep(3600)  # the test SIGKILLs us here


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(obj, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _list_files(directory: Path) -> list[str]:
    """Every regular file under ``directory``, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _my_share(names: list[str]) -> list[str]:
    rank, world = _world()
    return names[rank::world]


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own files: RNG tuples, loop state
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------------------------------------------
# State pieces
# ----------------------------------------------------------------------------------------------------------------


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    from oapl_megatron.models.hf_io import unwrap

    return unwrap(chunk)


def _model_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _sharded_state(state: TrainState, is_loading: bool) -> dict:
    """{"model"|"model{i}": sharded model state, "optimizer": sharded optimizer state} (dp_reshardable)."""
    sd = {key: _unwrap(c).sharded_state_dict(metadata=dict(_SHARDING_METADATA))
          for key, c in zip(_model_keys(state.chunks), state.chunks)}
    sd["optimizer"] = state.optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                         metadata=dict(_SHARDING_METADATA))
    return sd


def _rng_state(ctx: ParallelContext) -> dict:
    from megatron.core import tensor_parallel

    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:
        np_state = None
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {
        "coords": (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank),
        "python": random.getstate(),
        "numpy": np_state,
        "torch_cpu": torch.get_rng_state(),
        # On CPU megatron's "CUDA" RNG is the CPU generator (cpu_compat), already saved above.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {name: s.clone() for name, s in tracker.items()},
    }


def _derived_seed(step: int, coords: tuple[int, int, int]) -> int:
    """A deterministic seed for a rank that did not exist when the checkpoint was written."""
    digest = hashlib.sha256(f"oapl-rng/step{step}/tp{coords[0]}/pp{coords[1]}/dp{coords[2]}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _set_rng_state(saved: dict, python_np_torch: dict | None, step: int, ctx: ParallelContext) -> None:
    """Restore the tracker from ``saved`` and the host RNGs from ``python_np_torch`` (or seed them if None)."""
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states({k: v.clone() for k, v in saved["tracker"].items()})
    if python_np_torch is None:
        # A DP rank that did not exist: seed deterministically from the step and this rank's coordinates.
        seed = _derived_seed(step, (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank))
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % 2**32)
        except ImportError:
            pass
        return
    random.setstate(python_np_torch["python"])
    if python_np_torch["numpy"] is not None:
        import numpy as np

        np.random.set_state(python_np_torch["numpy"])
    if python_np_torch["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(python_np_torch["cuda"])
    torch.set_rng_state(python_np_torch["torch_cpu"])


def _layout(ctx: ParallelContext) -> dict:
    return {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "vpp": ctx.vpp}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    try:
        out["megatron_core"] = md.version("megatron-core")
    except md.PackageNotFoundError:
        out["megatron_core"] = "unknown"
    return out


# ----------------------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------------------


def _prepare_tmp(root: Path, step: int) -> Path:
    final = checkpoint_dir(root, step)
    if final.exists():
        raise CheckpointError(f"{final} already exists; a step is saved once (refusing to replace a checkpoint)")
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if tmp.exists():  # a crashed earlier attempt at this step
        shutil.rmtree(tmp)
    (tmp / MODEL_OPTIM).mkdir(parents=True)
    (tmp / "rng").mkdir()
    _fsync_dir(root)
    return tmp


def _write_rank0_files(tmp: Path, step: int, state: TrainState, ctx: ParallelContext, extra: dict,
                       config, rng_coords: list) -> None:
    _torch_save({"scheduler": state.scheduler.state_dict(), "skipped_steps": state.skipped_steps},
                tmp / "trainer_state.pt")
    try:
        _torch_save(extra, tmp / "extra.pt")
    except Exception as exc:
        raise CheckpointError(f"extra (the loop state dict) cannot be pickled into {tmp / 'extra.pt'}: {exc}") \
            from None
    if config is not None:
        cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
        _write_json(cfg, tmp / "config.json")
    _write_json({"format_version": FORMAT_VERSION, "step": step, "layout": _layout(ctx),
                 "rng_coords": {str(r): list(c) for r, c in enumerate(rng_coords)}, "versions": _versions(),
                 "saved_at_unix": time.time()}, tmp / "meta.json")


def _checksum_share(tmp: Path, checksum: bool) -> dict:
    out = {}
    for name in _my_share(_list_files(tmp)):
        path = tmp / name
        _fsync_file(path)
        out[name] = {"size": path.stat().st_size, "crc32": _crc32(path) if checksum else None}
    return out


def _commit(root: Path, tmp: Path, step: int, manifest: dict, keep_last: int) -> Path:
    """Rank 0: write the manifest, rename the temp dir into place (the commit point), prune old checkpoints."""
    _write_json(manifest, tmp / MARKER)
    for sub in (tmp / MODEL_OPTIM, tmp / "rng", tmp):
        _fsync_dir(sub)
    _test_pause("before_commit", step)
    final = checkpoint_dir(root, step)
    os.rename(tmp, final)
    _fsync_dir(root)
    try:
        _prune(root, keep_last, newest=final)
    except OSError as exc:  # the new checkpoint is committed; a failed deletion must not fail the save
        logger.warning("checkpoint %s saved, but pruning older checkpoints failed: %s", final, exc)
    return final


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


def save_checkpoint(root: str | os.PathLike, step: int, state: TrainState, ctx: ParallelContext, extra: dict,
                    keep_last: int, config=None, checksum: bool = True) -> Path:
    """Write ``root/step_{step:08d}`` atomically and keep the newest ``keep_last`` complete checkpoints.

    Collective over every trainer rank (same ``root``/``step``/``keep_last``; ``extra`` and ``config`` are taken
    from rank 0). Sequence: rank 0 creates the temp dir → all ranks agree → dist_checkpointing save of model +
    optimizer (collective) → every rank writes its RNG file, rank 0 the scheduler/extra/config/meta files → all
    agree → each rank fsyncs and checksums its share of the files → rank 0 writes ``COMPLETE``, renames the temp
    dir into place and prunes → all agree. Every wait is bounded by the world's timeout. ``checksum=False``
    records sizes only (skips reading the files back for CRC-32). Returns the checkpoint path on every rank.
    """
    from megatron.core import dist_checkpointing

    if step < 0 or keep_last < 1:
        raise CheckpointError(f"save_checkpoint: step={step} must be >= 0 and keep_last={keep_last} >= 1")
    root = Path(root)
    rank, world = _world()
    tmp = root / f"{TMP_PREFIX}{checkpoint_dir(root, step).name}"

    err = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _, err = _capture(_prepare_tmp, root, step)
    _agree(f"checkpoint step {step}: creating {tmp}", err)

    sharded = _sharded_state(state, is_loading=False)
    try:
        dist_checkpointing.save(sharded, str(tmp / MODEL_OPTIM))
    except Exception as exc:
        raise CheckpointError(f"rank {rank}: dist_checkpointing save into {tmp / MODEL_OPTIM} failed: {exc}") \
            from exc
    _test_pause("after_model_optim", step)

    rng = _rng_state(ctx)
    coords = [None] * world
    if world > 1:
        dist.all_gather_object(coords, rng["coords"])
    else:
        coords = [rng["coords"]]
    _, err = _capture(_torch_save, rng, tmp / "rng" / f"rank{rank}.pt")
    if rank == 0 and err is None:
        _, err = _capture(_write_rank0_files, tmp, step, state, ctx, extra, config, coords)
    _agree(f"checkpoint step {step}: writing {tmp}", err)

    files, err = _capture(_checksum_share, tmp, checksum)
    _agree(f"checkpoint step {step}: checksumming {tmp}", err)
    shares = [None] * world
    if world > 1:
        dist.all_gather_object(shares, files)
    else:
        shares = [files]

    final, err = None, None
    if rank == 0:
        manifest = {"format_version": FORMAT_VERSION, "step": step,
                    "files": {k: v for share in shares for k, v in sorted(share.items())}}
        final, err = _capture(_commit, root, tmp, step, manifest, keep_last)
    _agree(f"checkpoint step {step}: committing {tmp}", err)
    return checkpoint_dir(root, step)


# ----------------------------------------------------------------------------------------------------------------
# Find and load
# ----------------------------------------------------------------------------------------------------------------


def latest_checkpoint(root: str | os.PathLike, cleanup: bool | None = None) -> Path | None:
    """The newest complete checkpoint under ``root`` (highest step with a valid ``COMPLETE`` manifest), or None.

    Not a collective. Temp dirs (``.tmp_*``: interrupted saves or deletions) are ignored, and deleted when
    ``cleanup`` (default: on global rank 0 only). Call it when no save is in progress on this root."""
    root = Path(root)
    if not root.is_dir():
        return None
    if cleanup is None:
        cleanup = _world()[0] == 0
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{marker}: format_version {manifest.get('format_version')!r}, this code reads "
                              f"{FORMAT_VERSION}")
    return manifest


def _validate(path: Path, manifest: dict, checksum: bool) -> None:
    """Every manifest file exists with its size (all ranks, cheap); CRC-32 of this rank's share."""
    files = manifest["files"]
    for name, info in files.items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {path / MARKER})")
        size = p.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{p} has {size} bytes, the manifest says {info['size']} (truncated or replaced)")
    if checksum:
        for name in _my_share(sorted(files)):
            want = files[name].get("crc32")
            if want is not None and _crc32(path / name) != want:
                raise CheckpointError(f"{path / name} is corrupted (CRC-32 differs from {path / MARKER})")


def _check_layout(meta: dict, ctx: ParallelContext, path: Path) -> None:
    saved = meta["layout"]
    if (saved["tp"], saved["pp"], saved["vpp"]) != (ctx.tp, ctx.pp, ctx.vpp):
        raise CheckpointError(
            f"{path}: saved at tp={saved['tp']} pp={saved['pp']} vpp={saved['vpp']}, this run is tp={ctx.tp} "
            f"pp={ctx.pp} vpp={ctx.vpp}; the optimizer state (dp_reshardable) reshards over DP only. Resume with "
            f"the same parallel.tp/pp/vpp (any DP size), or convert the model alone (oapl-convert reshard)"
        )


def _read_small_files(path: Path, ctx: ParallelContext, meta: dict) -> tuple[dict, dict, dict | None, dict]:
    """(trainer_state, tracker source, host-RNG source or None, extra) for this rank."""
    trainer_state = _torch_load(path / "trainer_state.pt")
    extra = _torch_load(path / "extra.pt")
    saved_coords = {tuple(c): int(r) for r, c in meta["rng_coords"].items()}
    mine = (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank)
    if mine in saved_coords:
        src = _torch_load(path / "rng" / f"rank{saved_coords[mine]}.pt")
        return trainer_state, src, src, extra
    # A DP rank that did not exist: the TP-region tracker streams are the same on every DP replica (megatron
    # seeds them by tp_rank only), so take them from DP rank 0 at the same (tp, pp); host RNGs are seeded.
    src = _torch_load(path / "rng" / f"rank{saved_coords[(ctx.tp_rank, ctx.pp_rank, 0)]}.pt")
    return trainer_state, src, None, extra


def load_checkpoint(path: str | os.PathLike, state: TrainState, ctx: ParallelContext, checksum: bool = True) -> dict:
    """Restore model, optimizer (Adam moments and step), scheduler, skipped steps and this rank's RNG; return extra.

    Collective over every trainer rank. Checks first, before anything is modified: the manifest, every file's
    size (and CRC-32, split over ranks, unless ``checksum=False``) and the layout — a missing, truncated or
    corrupted file raises CheckpointError naming it, on every rank. The DP size may differ from the saving run
    (dist_checkpointing reshards model and optimizer over DP); TP/PP/VPP must match. RNG: a rank whose (tp, pp, dp)
    coordinates existed gets its saved states; a new DP rank gets DP rank 0's TP-tracker states and host RNGs
    seeded from (step, coordinates).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    rank, _ = _world()

    def _preflight():
        manifest = read_manifest(path)
        meta_path = path / "meta.json"
        _validate(path, manifest, checksum)
        meta = json.loads(meta_path.read_text())
        if meta.get("step") != manifest["step"]:
            raise CheckpointError(f"{meta_path}: step {meta.get('step')} differs from {path / MARKER}")
        _check_layout(meta, ctx, path)
        return meta, _read_small_files(path, ctx, meta)

    pre, err = _capture(_preflight)
    _agree(f"loading checkpoint {path}", err)
    meta, (trainer_state, tracker_src, host_src, extra) = pre

    materialise_fresh_adam_state(state.optimizer)
    sharded = _sharded_state(state, is_loading=True)
    try:
        with torch.no_grad():
            loaded = dist_checkpointing.load(sharded, str(path / MODEL_OPTIM))
    except Exception as exc:
        raise CheckpointError(f"rank {rank}: dist_checkpointing load of {path / MODEL_OPTIM} failed: {exc}") \
            from exc

    def _apply():
        with torch.no_grad():
            for key, chunk in zip(_model_keys(state.chunks), state.chunks):
                _unwrap(chunk).load_state_dict(loaded[key], strict=True)
            state.optimizer.load_state_dict(loaded["optimizer"])
            try:
                restore_adam_steps(state.optimizer, loaded["optimizer"])
            except ValueError as exc:
                raise CheckpointError(f"{path / MODEL_OPTIM}: {exc}") from exc
        state.scheduler.load_state_dict(trainer_state["scheduler"])
        state.skipped_steps = int(trainer_state["skipped_steps"])
        _set_rng_state(tracker_src, host_src, meta["step"], ctx)

    _, err = _capture(_apply)
    _agree(f"restoring state from {path}", err)
    return extra
