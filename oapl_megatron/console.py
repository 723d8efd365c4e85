"""What reaches the console: our own lines, the progress bar and real problems — not third-party noise.

Every process of ours (trainer ranks, the demo) calls :func:`install` first thing, before megatron-core or torch's
distributed modules are imported (they warn at import time). Python warnings are then routed:

- a warning listed in :data:`KNOWN_HARMLESS` (each with why it is harmless here) goes to a log file only;
- any other warning still goes to the console — it may be a real problem — and to the log file.

The log file is ``RUN_DIR/logs/warnings.rank{R}.log`` once :func:`set_run_dir` names the run directory; warnings from
before that (imports) are kept in memory and written out then, so nothing is lost.

    from oapl_megatron import console
    console.install()                       # first thing in main()
    ...
    console.set_run_dir(cfg.run_dir)        # once the run directory is known
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownWarning:
    category: type[Warning]
    message: str  # regular expression, matched at the start of the message
    module: str  # regular expression on the warning's file path
    why: str
    cpu_only: bool = False  # harmless only where CUDA is absent (on GPU it is advice to follow)


KNOWN_HARMLESS: tuple[KnownWarning, ...] = (
    KnownWarning(UserWarning, r"Transformer Engine and Apex are not installed\. Falling back", r"megatron[/\\]core",
                 "megatron-core's local (torch) implementations are the ones the CPU path is built and tested on; "
                 "TE cannot be installed without a GPU, and on GPU the `gpu` extra brings it", cpu_only=True),
    KnownWarning(UserWarning, r"Apex is not installed\. Falling back to Torch Norm", r"megatron[/\\]core",
                 "the local layer spec uses torch's RMSNorm/LayerNorm on purpose (no Apex on these machines)"),
    KnownWarning(UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope", r"megatron[/\\]core",
                 "megatron-core 0.16.1's own TransformerConfig default triggers it; we never enable CUDA graphs"),
    KnownWarning(UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
                 r"megatron[/\\]core[/\\]optimizer",
                 "megatron's optimizer probes `param.main_grad`/`.grad` with hasattr on views; it reads nothing"),
    KnownWarning(UserWarning, r"When using async grad allreduce it is recommended to set the environment variable "
                 r"CUDA_DEVICE_MAX_CONNECTIONS", r"megatron[/\\]core",
                 "a CUDA stream-ordering hint; meaningless on CPU (on GPU the launcher sets the variable)",
                 cpu_only=True),
    KnownWarning(FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
                 r"torch[/\\]distributed",
                 "megatron-core 0.16.1 calls the old c10d names, which torch 2.13 still supports"),
)

_state: dict = {"installed": False, "pending": [], "file": None, "rank": 0}


def _cuda_absent() -> bool:
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_available()


def is_known_harmless(message: str, category: type[Warning], filename: str) -> KnownWarning | None:
    for k in KNOWN_HARMLESS:
        if issubclass(category, k.category) and re.match(k.message, message) and re.search(k.module, filename):
            if k.cpu_only and not _cuda_absent():
                continue
            return k
    return None


def _write_log(line: str) -> None:
    if _state["file"] is not None:
        _state["file"].write(line)
        _state["file"].flush()
    else:
        _state["pending"].append(line)


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    text = warnings.formatwarning(message, category, filename, lineno, line)
    _write_log(text)
    if is_known_harmless(str(message), category, filename) is None:
        sys.stderr.write(text)


def install(rank: int | None = None) -> None:
    """Route Python warnings as described above (idempotent)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    _state["rank"] = rank
    if _state["installed"]:
        return
    _state["installed"] = True
    warnings.showwarning = _showwarning


def set_run_dir(run_dir: str | os.PathLike) -> Path:
    """Start writing the warning log under ``run_dir/logs`` (with what was held back); returns its path."""
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"warnings.rank{_state['rank']}.log"
    if _state["file"] is not None:
        _state["file"].close()
    _state["file"] = open(path, "a", buffering=1)
    for line in _state["pending"]:
        _state["file"].write(line)
    _state["pending"].clear()
    return path
