"""torch.distributed private internals we rely on, in one place, behind a torch version check (STYLE 12).

torch has no public API to read a process group's timeout, nor to pass one to a ``ProcessGroupNCCL`` built by
hand (its constructor takes an ``Options`` object whose timeout field is the private ``_timeout``). Both are used:

* :func:`process_group_timeout` — the timeout a group was created with (the checkpoint barriers reuse the world's);
* :func:`nccl_options` — ``ProcessGroupNCCL.Options`` carrying a timeout (the weight-sync data plane builds its NCCL
  group outside ``init_process_group``).

Written for and checked on torch 2.13 (CPU wheel, this project's pin) and 2.11 (the stock image of the lent GPU
machines); the attributes are unchanged from 2.11 to 2.14. On any other torch, :func:`check_torch_version` raises
with the version and what to do, instead of silently reading a missing field. Run the check with
``python -m oapl_megatron.parallel.torch_compat``.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

# (major, minor) releases whose private fields below were read in their sources
SUPPORTED_TORCH = ((2, 11), (2, 12), (2, 13), (2, 14))


class UnsupportedTorchError(RuntimeError):
    """This torch release is not one whose private distributed internals were checked."""


def _release(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise UnsupportedTorchError(f"cannot parse the torch version {version!r}") from None


def check_torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of torch; raises :class:`UnsupportedTorchError` outside :data:`SUPPORTED_TORCH`."""
    version = torch.__version__ if version is None else version
    release = _release(version)
    if release not in SUPPORTED_TORCH:
        known = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_TORCH)
        raise UnsupportedTorchError(
            f"torch {version}: oapl_megatron.parallel.torch_compat reads private torch.distributed fields "
            f"(ProcessGroup options '_timeout') that were checked only for torch {known}; check them in this "
            f"torch's sources and add the release to SUPPORTED_TORCH, or install a supported torch")
    return release


def process_group_timeout(group: dist.ProcessGroup | None = None) -> timedelta:
    """The timeout ``group`` (default: the world) was created with.

    ``group``: a ``ProcessGroup`` (from ``init_process_group``/``new_group``: read from its backend's options,
    ``_get_backend(device).options._timeout``, CPU backend first, then CUDA) or a backend built by hand
    (``ProcessGroupGloo``/``ProcessGroupNCCL``: its own ``options._timeout``). Falls back to torch's default
    timeout only when the group has no backend for either device.
    """
    check_torch_version()
    group = dist.group.WORLD if group is None else group
    if not hasattr(group, "_get_backend"):  # a backend object itself
        return group.options._timeout
    for device in ("cpu", "cuda"):
        try:
            backend = group._get_backend(torch.device(device))
        except RuntimeError:  # no backend registered for this device type
            continue
        return backend.options._timeout
    return dist.default_pg_timeout


def nccl_options(timeout: timedelta):
    """``ProcessGroupNCCL.Options`` with ``timeout`` set (raises on a torch built without NCCL)."""
    check_torch_version()
    if not hasattr(dist, "ProcessGroupNCCL"):
        raise RuntimeError(f"torch {torch.__version__} was built without NCCL; use the gloo backend")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return opts


if __name__ == "__main__":
    print(f"torch {torch.__version__}: supported release {check_torch_version()}")
