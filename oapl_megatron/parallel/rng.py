"""Host random-number generators of one process: seed them, capture their state, restore it.

The one place the project seeds python ``random``, numpy's global generator and torch's default generators
(``torch.manual_seed`` seeds the CPU generator and every CUDA device's). Used by
:func:`oapl_megatron.parallel.bootstrap.init_distributed` (every rank, the run's seed) and by the checkpoint
loader (saved states, or a derived seed for a rank that did not exist when the checkpoint was written)::

    from oapl_megatron.parallel.rng import derived_seed, host_rng_state, seed_host_rngs, set_host_rng_state

    seed_host_rngs(1234)
    saved = host_rng_state()                     # picklable dict
    set_host_rng_state(saved)
    seed_host_rngs(derived_seed("oapl-rng", "step3", "tp0", "pp1", "dp2"))

megatron's model-parallel RNG tracker is not a host generator; bootstrap seeds it and the checkpoint saves it.
"""

from __future__ import annotations

import hashlib
import random

import torch


def _numpy():
    try:
        import numpy as np
    except ImportError:  # numpy is a megatron dependency; this is only for minimal environments
        return None
    return np


def seed_host_rngs(seed: int) -> None:
    """Seed python ``random``, numpy (seed mod 2**32, its limit) and torch (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)
    np = _numpy()
    if np is not None:
        np.random.seed(seed % 2**32)


def host_rng_state() -> dict:
    """``{"python", "numpy", "torch_cpu", "cuda"}`` states (numpy/cuda None when absent); picklable."""
    np = _numpy()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state() if np is not None else None,
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_host_rng_state(state: dict) -> None:
    """Restore what :func:`host_rng_state` returned (a saved CUDA state is skipped on a machine without CUDA)."""
    random.setstate(state["python"])
    if state["numpy"] is not None:
        np = _numpy()
        if np is None:
            raise RuntimeError("the saved RNG state has a numpy generator state, and numpy is not importable")
        np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    torch.set_rng_state(state["torch_cpu"])


def derived_seed(*parts: object) -> int:
    """A deterministic seed in [0, 2**63) from the given parts (stable across processes and Python versions)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63
