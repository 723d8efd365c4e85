"""Checkpoint conversion between Hugging Face safetensors and Megatron checkpoints, and the live-model HF writer.

The logic behind ``oapl-convert`` (see :mod:`oapl_megatron.entrypoints.convert`)::

    hf_to_mcore("/models/Qwen3-0.6B", "ckpt/qwen3", tp=2, pp=2)
    mcore_to_hf("ckpt/qwen3", "out/qwen3-hf", dtype="bf16")
    mcore_to_hf(run_checkpoint("runs/demo"), "out/demo-hf")     # the newest complete checkpoint of a run
    reshard("ckpt/qwen3", "ckpt/qwen3-tp1", tp=1, pp=1)

plus :func:`write_hf_checkpoint`, which the orchestrator uses to export the live policy.

One checkpoint format (:mod:`oapl_megatron.trainer.checkpoint.layout`): a trainer checkpoint
(``run/checkpoints/step_*``, kind ``training``) converts as it is, and ``hf_to_mcore``/``reshard`` write the same
layout with the model alone (kind ``model``): the ``oapl_checkpoint.json`` sidecar, ``hf/`` (the HF config and
tokenizer files), ``model_optim/`` (dist_checkpointing of the model; keys are global, so any tp/pp/vpp loads it)
and the ``COMPLETE`` manifest with each file's size and CRC-32, written last. A directory without a manifest (an
interrupted conversion) is refused. Checkpoints of format 1 (before the formats were one) get an error that says
so; they are not read.

Process model and memory (the design choice): every conversion runs a gloo world of its own, spawned here
(``torch.multiprocessing``, one process when the world is 1 and this process has no process group). Each rank
builds only its Megatron shard and reads only its own tensors (``safe_open`` memory-maps the files), so the peak
resident memory of a rank is about ``model / world`` plus the runtime (~0.5 GB of imports); the machine total is
about one model plus ``world`` runtimes.

* ``hf_to_mcore`` runs ``tp·pp`` ranks in the target layout; no rank ever holds more than its shard.
* ``mcore_to_hf`` runs ``workers`` pipeline stages (tp=1); rank 0 receives the other stages' tensors one at a
  time (``iter_hf_weights``) and writes each output safetensors file as soon as it is complete, so it holds its
  own stage plus at most one output file (``max_shard_size``). Raise ``workers`` to bound per-process memory.
* ``reshard`` runs the target layout and lets dist_checkpointing reshard on load.

A single process at TP1·PP1 would hold the whole model; a true layer-streaming writer of the torch_dist format
without a model would have to re-implement megatron's sharded keys and metadata, which is what ties a checkpoint
to a megatron version, so it is not done.

Errors are raised before any process is spawned where possible: unsupported architecture (naming the config
field), missing shard file, truncated safetensors file, missing tensor, shape mismatch (naming tensor and file),
a tensor the mapping would drop.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from oapl_megatron.trainer.checkpoint.layout import (
    HF_SUBDIR,
    SIDECAR,
    copy_hf_side_files,
    model_sidecar,
    read_sidecar,
)

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class ConvertError(RuntimeError):
    """A conversion input is unusable; the message names the file, tensor or flag."""


# ----------------------------------------------------------------------------------------------------------------
# Pre-flight checks (no megatron, no process group)
# ----------------------------------------------------------------------------------------------------------------


def check_hf_checkpoint(hf_dir: Path, arch):
    """Open every safetensors file's header and check names and shapes against ``arch``; returns the source.

    Reads headers only (no tensor data). Raises ``CheckpointFileError`` for a missing shard file or a truncated /
    corrupt file, ``MappingError`` for a missing tensor, a wrong shape (naming tensor and file) or a tensor the
    mapping would silently drop.
    """
    from oapl_megatron.models import mapping as M
    from oapl_megatron.models.hf_io import SafetensorsSource

    src = SafetensorsSource(hf_dir)
    expected = M.hf_shapes(arch)
    for name, shape in expected.items():
        if name not in src.weight_map:
            raise M.MappingError(f"{hf_dir}: tensor {name!r} is missing (needed by the {arch.family} config)")
        got = tuple(src.open_file(src.weight_map[name]).get_slice(name).get_shape())
        if got != shape:
            raise M.MappingError(f"{src.file_of(name)}: tensor {name!r} has shape {got}, the config implies {shape}")
    ignorable = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    extra = [n for n in src.weight_map if n not in expected and n not in ignorable
             and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        raise M.MappingError(f"{src.file_of(extra[0])}: tensor {extra[0]!r} (and {len(extra) - 1} more) has no "
                             f"Megatron counterpart for family {arch.family}; converting would drop it")
    return src


def _hf_dtype(hf_config: dict) -> str:
    return str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")


def open_checkpoint(ckpt_dir: str | os.PathLike) -> dict:
    """The sidecar of a complete checkpoint of either kind, after checking its manifest and file sizes.

    CheckpointError naming the file: no sidecar (not a checkpoint), format 1, no ``COMPLETE`` (interrupted
    save), a listed file missing or of another size. CRC-32s are not read here (that would read the whole
    checkpoint once more); a corrupted tensor file fails in dist_checkpointing's load."""
    from oapl_megatron.trainer.checkpoint.commit import read_manifest, validate_files

    side = read_sidecar(ckpt_dir)
    validate_files(Path(ckpt_dir), read_manifest(ckpt_dir))
    return side


def run_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest complete checkpoint of a training run directory (``oapl-convert mcore-to-hf --run-dir``).

    The checkpoint root is the run's ``checkpoint.dir`` from its resolved ``config.yaml`` (default
    ``RUN/checkpoints``). Read-only: temp dirs of a save in progress are left alone."""
    import yaml

    from oapl_megatron.config.checkpoint import CheckpointConfig
    from oapl_megatron.trainer.checkpoint.commit import latest_checkpoint

    run_dir = Path(run_dir)
    resolved = run_dir / "config.yaml"
    if not resolved.is_file():
        raise ConvertError(f"--run-dir {run_dir}: no config.yaml; not a run directory written by oapl-train")
    section = (yaml.safe_load(resolved.read_text()) or {}).get("checkpoint") or {}
    root = CheckpointConfig(**section).resolve_dir(run_dir)
    path = latest_checkpoint(root, cleanup=False)
    if path is None:
        raise ConvertError(f"--run-dir {run_dir}: no complete checkpoint under {root} (checkpoint.every_steps = 0, "
                           f"or the run ended before its first save)")
    return path


def _prepare_out(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConvertError(f"--out {out_dir} exists and is not empty; choose a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MB"``, ``"64KB"`` or a byte count → bytes (powers of 1000, like transformers)."""
    t = str(text).strip().upper()
    for suffix, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points (run in the calling process; spawn the workers)
# ----------------------------------------------------------------------------------------------------------------


def hf_to_mcore(hf_dir, out_dir, tp: int = 1, pp: int = 1, dtype: str = "auto", timeout_s: float = 1800) -> dict:
    """Convert an HF directory into a Megatron checkpoint written at ``tp``·``pp``; returns the sidecar."""
    from oapl_megatron.models.builder import check_layout
    from oapl_megatron.models.hf_config import arch_from_hf, load_hf_config

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config, _ = load_hf_config(hf_dir)
    arch = arch_from_hf(hf_dir)
    check_layout(arch, tp, pp, flags=True)
    check_hf_checkpoint(hf_dir, arch)
    if dtype == "auto":
        dtype = "bfloat16" if _hf_dtype(hf_config) == "bfloat16" else "float32"
    else:
        dtype = DTYPE_NAMES.get(dtype, dtype)
    if dtype not in ("float32", "bfloat16"):
        raise ConvertError(f"--dtype {dtype}: the Megatron checkpoint is float32 or bfloat16 (fp16 → use fp32)")
    _prepare_out(out_dir)
    side = model_sidecar(arch, tp, pp, None, "local", dtype, hf_dir)
    _run_world(tp * pp, {"job": "hf_to_mcore", "tp": tp, "pp": pp, "hf_dir": str(hf_dir), "out": str(out_dir),
                         "side": side, "timeout_s": timeout_s})
    _finish(out_dir, hf_dir, side)
    return side


def mcore_to_hf(ckpt_dir, out_dir, dtype: str | None = None, workers: int = 1, max_shard_size: str = "2GB",
                timeout_s: float = 1800) -> list[str]:
    """Write an HF directory (safetensors + config.json + tokenizer files); returns the weight file names.

    ``ckpt_dir``: a checkpoint of either kind (a trainer's ``step_*`` dir or ``hf_to_mcore``/``reshard``
    output); only the model is read. ``dtype``: bf16 | fp16 | fp32; default the dtype in the original HF config.
    ``workers``: pipeline stages used to read the checkpoint (must divide the layer count).
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    side = open_checkpoint(ckpt_dir)
    hf_config = json.loads((ckpt_dir / HF_SUBDIR / "config.json").read_text())
    out_dtype = DTYPE_NAMES[dtype] if dtype else _hf_dtype(hf_config)
    if out_dtype not in DTYPE_NAMES.values():
        raise ConvertError(f"--dtype {dtype!r}: choose bf16, fp16 or fp32")
    if side["arch"]["num_layers"] % workers:
        raise ConvertError(f"--workers {workers} does not divide num_hidden_layers={side['arch']['num_layers']}")
    _prepare_out(out_dir)
    _run_world(workers, {"job": "mcore_to_hf", "tp": 1, "pp": workers, "ckpt": str(ckpt_dir), "out": str(out_dir),
                         "side": side, "out_dtype": out_dtype, "max_shard_bytes": parse_size(max_shard_size),
                         "timeout_s": timeout_s})
    return sorted(p.name for p in out_dir.glob("*.safetensors"))


def reshard(ckpt_dir, out_dir, tp: int, pp: int, timeout_s: float = 1800) -> dict:
    """Rewrite the model of a checkpoint (either kind) at another layout (dist_checkpointing reshards on load);
    the output is a model-only checkpoint. Returns its sidecar."""
    from oapl_megatron.models.builder import check_layout
    from oapl_megatron.models.hf_config import ArchSpec

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    side = dict(open_checkpoint(ckpt_dir))
    check_layout(ArchSpec(**side["arch"]), tp, pp, flags=True)
    _prepare_out(out_dir)
    side.update(tp=tp, pp=pp, vpp=None)
    _run_world(tp * pp, {"job": "reshard", "tp": tp, "pp": pp, "ckpt": str(ckpt_dir), "out": str(out_dir),
                         "side": side, "timeout_s": timeout_s})
    _finish(out_dir, ckpt_dir / HF_SUBDIR, side)
    return side


def _finish(out_dir: Path, hf_files: Path, side: dict) -> None:
    """HF side files and sidecar next to the written model_optim/, then the manifest, last (one process)."""
    from oapl_megatron.trainer.checkpoint.commit import seal, write_json

    copy_hf_side_files(hf_files, out_dir / HF_SUBDIR)
    write_json(side, out_dir / SIDECAR)
    seal(out_dir, kind="model")


# ----------------------------------------------------------------------------------------------------------------
# The gloo world
# ----------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world: int, job: dict) -> None:
    """Run ``job`` on ``world`` gloo ranks: in this process when world is 1 and it has no process group."""
    import torch.distributed as dist

    if world == 1 and not dist.is_initialized():
        _worker(None, 1, 0, job)
        return
    if dist.is_initialized():
        raise ConvertError("conversion with several ranks must start from a process without a process group")
    import torch.multiprocessing as mp

    try:
        mp.start_processes(_worker, args=(world, _free_port(), job), nprocs=world, join=True, start_method="spawn")
    except mp.ProcessRaisedException as exc:
        raise ConvertError(f"conversion worker failed:\n{exc}") from None


def _worker(rank: int | None, world: int, port: int, job: dict) -> None:
    from oapl_megatron.config.schema import ParallelConfig
    from oapl_megatron.parallel.bootstrap import init_distributed, shutdown

    if rank is not None:  # spawned: a torchrun-like environment for bootstrap
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    ctx = init_distributed(ParallelConfig(tp=job["tp"], pp=job["pp"], backend="gloo", timeout_s=job["timeout_s"]),
                           seed=0)
    try:
        {"hf_to_mcore": _job_hf_to_mcore, "mcore_to_hf": _job_mcore_to_hf, "reshard": _job_reshard}[job["job"]](
            ctx, job)
    finally:
        shutdown()
    if rank is not None:
        from oapl_megatron.parallel.cpu_compat import stop_checkpoint_writer_manager

        # Everything is written and closed (the save and the HF writer are synchronous). A spawned rank that has
        # imported torch + megatron spends 5-25 s in interpreter teardown on a busy 2-core machine; skip it, after
        # stopping the one helper process dist_checkpointing starts, so none is orphaned.
        stop_checkpoint_writer_manager()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _build(ctx, side: dict):
    from oapl_megatron.config.schema import ModelConfig
    from oapl_megatron.models.builder import build_policy
    from oapl_megatron.models.hf_config import ArchSpec

    arch = ArchSpec(**side["arch"])
    # The local spec on any machine: its sharded-state keys equal the TE spec's (megatron maps the layer norms),
    # so a checkpoint written with either loads.
    chunks = build_policy(arch, ModelConfig(transformer_impl="local", params_dtype=side["dtype"]), ctx)
    return arch, chunks


def _progress(ctx, what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"[rank {ctx.rank}] {what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=ctx.rank != 0)


def _job_hf_to_mcore(ctx, job) -> None:
    from oapl_megatron.models.hf_io import load_hf_weights
    from oapl_megatron.trainer.checkpoint import save_model_state

    arch, chunks = _build(ctx, job["side"])
    with _progress(ctx, "load HF tensors") as bar:
        task = bar.add_task("load", total=None)
        load_hf_weights(chunks, ctx, arch, job["hf_dir"],
                        progress=lambda done, total: bar.update(task, completed=done, total=total))
    save_model_state(chunks, job["out"])


def _job_reshard(ctx, job) -> None:
    from oapl_megatron.trainer.checkpoint import load_model_state, save_model_state

    _, chunks = _build(ctx, job["side"])
    load_model_state(chunks, job["ckpt"])
    save_model_state(chunks, job["out"])


def _job_mcore_to_hf(ctx, job) -> None:
    from oapl_megatron.trainer.checkpoint import load_model_state

    arch, chunks = _build(ctx, job["side"])
    load_model_state(chunks, job["ckpt"])
    write_hf_checkpoint(chunks, ctx, arch, job["out"], Path(job["ckpt"]) / HF_SUBDIR, job["out_dtype"],
                        job["max_shard_bytes"])


def write_hf_checkpoint(chunks, ctx, arch, out_dir, side_files_dir, dtype: str = "bfloat16",
                        max_shard_size: int | str = "2GB") -> list[str] | None:
    """Write the live model as an HF directory that transformers and vLLM load as is; returns the files on rank 0.

    Collective: the :func:`~oapl_megatron.models.hf_io.iter_hf_weights` contract with ``dst_rank=0`` (every rank
    of rank 0's TP × PP replica). Rank 0 writes ``*.safetensors`` (+ index when several) in ``dtype``
    (``"bfloat16"``/``"float16"``/``"float32"``), ``config.json`` from ``side_files_dir`` with its dtype set to
    ``dtype``, and the other non-weight files of ``side_files_dir`` (generation config, tokenizer). Memory on rank
    0: its own stage plus one output file.
    """
    import torch

    from oapl_megatron.models import mapping as M
    from oapl_megatron.models.hf_io import iter_hf_weights

    out_dir, side_files_dir = Path(out_dir), Path(side_files_dir)
    writer = None
    if ctx.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
        writer = ShardedHFWriter(out_dir, M.hf_shapes(arch), getattr(torch, dtype), max_bytes)
    with _progress(ctx, "write HF tensors") as bar:
        task = bar.add_task("write", total=len(writer.plan_names) if writer else None)
        for name, tensor in iter_hf_weights(chunks, ctx, arch, dst_rank=0, include_tied_lm_head=False):
            writer.add(name, tensor)
            bar.advance(task)
    if writer is None:
        return None
    writer.finish()
    copy_hf_side_files(side_files_dir, out_dir)
    hf_config = json.loads((side_files_dir / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):  # transformers 5 reads "dtype"; older files carry "torch_dtype"
        if key in hf_config or key == "dtype":
            hf_config[key] = dtype
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return writer.file_names


class ShardedHFWriter:
    """Writes HF safetensors files as tensors arrive, in the order planned from the architecture's shapes.

    The plan (which tensor goes to which file) is fixed before any data arrives, so every file is written as
    soon as its last tensor arrives and the index needs no second pass. One file → ``model.safetensors``;
    several → ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    """

    def __init__(self, out: Path, shapes: dict, dtype, max_bytes: int):
        import torch

        self.out, self.dtype = out, dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        files: list[list[str]] = [[]]
        size = 0
        self.total = 0
        for name, shape in shapes.items():
            nbytes = itemsize * int(torch.Size(shape).numel())
            if files[-1] and size + nbytes > max_bytes:
                files.append([])
                size = 0
            files[-1].append(name)
            size += nbytes
            self.total += nbytes
        n = len(files)
        self.file_names = ["model.safetensors"] if n == 1 else \
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.plan_names = [name for f in files for name in f]
        self.last_of_file = {f[-1]: i for i, f in enumerate(files)}
        self.weight_map = {name: self.file_names[i] for i, f in enumerate(files) for name in f}
        self.pending: dict = {}
        self.seen = 0

    def add(self, name: str, tensor) -> None:
        expected = self.plan_names[self.seen] if self.seen < len(self.plan_names) else None
        if name != expected:
            raise ConvertError(f"HF writer: got tensor {name!r}, expected {expected!r} (mapping order changed?)")
        self.pending[name] = tensor.to(self.dtype).contiguous()
        self.seen += 1
        if name in self.last_of_file:
            from safetensors.torch import save_file

            save_file(self.pending, str(self.out / self.file_names[self.last_of_file[name]]),
                      metadata={"format": "pt"})
            self.pending = {}

    def finish(self) -> None:
        if self.seen != len(self.plan_names):
            raise ConvertError(f"HF writer: received {self.seen} of {len(self.plan_names)} tensors")
        if len(self.file_names) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


