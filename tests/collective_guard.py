"""A CPU-runnable check for the GPU bug class "a tensor handed to a collective is not on the group's device".

On a GPU machine the default group (and megatron's groups) is NCCL, which moves only CUDA tensors; a receive buffer
made with ``torch.empty(shape)`` lands on the CPU and the collective fails. On a CPU machine (gloo) the same code
runs fine, because the default device *is* the group's device. To see the bug on CPU, this guard tracks where a
tensor's device came from:

* a tensor made by a factory (``torch.empty/zeros/tensor/...``) **without an explicit ``device=``** is *implicit*:
  it sits on the default device by accident;
* anything computed from an implicit tensor is implicit too (views, ``+``, ``cat``...), except the result of an
  explicit move (``.to(device)``, ``.cuda()``, ``.cpu()``) or a copy into an explicitly placed tensor;
* every tensor passed to a ``torch.distributed`` collective (the module-level functions our code calls:
  ``send/recv/broadcast/gather/all_gather/all_reduce/...``) must be explicit and on ``device``; otherwise the
  collective raises :class:`CollectiveDeviceError` naming the function and the tensor.

Use (on every rank that takes part)::

    with collective_device_guard(ctx.device):
        for name, t in iter_hf_weights(chunks, ctx, arch, dst_rank=0):
            ...

The guard rebinds the functions on the ``torch.distributed`` module for the duration of the ``with`` (our code
calls ``dist.<fn>`` at call time, so it sees them) and pushes a ``TorchFunctionMode`` for the taint tracking; both
are undone on exit. Test-only: the mode slows every torch call in the block.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_flatten

_COLLECTIVES = ("send", "recv", "isend", "irecv", "broadcast", "gather", "scatter", "all_gather",
                "all_gather_into_tensor", "all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                "all_to_all", "all_to_all_single")
_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}


class CollectiveDeviceError(AssertionError):
    """A tensor handed to a collective is on the wrong device, or on the right one only by default."""


class _Taint(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        # id → weakref of implicitly placed tensors (a WeakSet would compare tensors with ==, which is elementwise)
        self._implicit: dict[int, weakref.ref] = {}

    def is_implicit(self, t: torch.Tensor) -> bool:
        ref = self._implicit.get(id(t))
        return ref is not None and ref() is t

    def _mark(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._implicit[id(t)] = weakref.ref(t)

    def _unmark(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._implicit.pop(id(t), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _device_constructors():
            if kwargs.get("device") is None:
                self._mark(out)
            return out
        if func in _MOVES:
            # an explicit placement; .to(dtype) alone is not one and keeps the input's status
            moved = func is not torch.Tensor.to or kwargs.get("device") is not None or any(
                isinstance(a, (torch.device, str)) or (isinstance(a, torch.Tensor) and not self.is_implicit(a))
                for a in args[1:])
            if moved:
                self._unmark(out)
                return out
        if getattr(func, "__name__", "") == "copy_" and args and isinstance(args[0], torch.Tensor):
            return out  # copying into a tensor keeps the destination's placement
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if any(self.is_implicit(a) for a in inputs):
            self._mark(out)
        return out


@contextlib.contextmanager
def collective_device_guard(device: torch.device | str):
    """Inside the block, every torch.distributed collective checks its tensors (see the module docstring)."""
    device = torch.device(device)
    taint = _Taint()
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def checked(*args, **kwargs):
            for t in tree_flatten((args, kwargs))[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                if t.device != device:
                    raise CollectiveDeviceError(f"torch.distributed.{name}: tensor {tuple(t.shape)} {t.dtype} is on "
                                                f"{t.device}, the group moves {device} tensors")
                if taint.is_implicit(t):
                    raise CollectiveDeviceError(
                        f"torch.distributed.{name}: tensor {tuple(t.shape)} {t.dtype} was allocated without an "
                        f"explicit device (it is on {t.device} only because that is the default device; with NCCL "
                        f"it would have to be on the GPU)")
            return fn(*args, **kwargs)

        return checked

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        with taint:
            yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
