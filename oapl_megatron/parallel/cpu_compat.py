"""The one place megatron-core is patched so that it runs on a CPU-only torch (gloo ranks, tests, the CPU demo).

megatron-core 0.16.1 calls CUDA unconditionally in many places (``torch.cuda.current_device()``,
``device="cuda"``, the CUDA RNG tracker, ``torch.cuda.synchronize()``); no combination of config flags avoids
it and the error is always ``AssertionError: Torch not compiled with CUDA enabled``. Instead of patching torch
globally, :func:`apply_cpu_compat` rebinds the module-global name ``torch`` *inside the megatron modules listed
below only* to :class:`_TorchCpuProxy`, a thin proxy that forwards every attribute to the real ``torch`` except:

* tensor factories (``zeros``, ``empty``, ``ones``, ``tensor``, ``arange``, ``full``, ``randn``, ...): a CUDA
  ``device`` argument becomes ``cpu`` and ``pin_memory`` is dropped (pinning needs an accelerator);
* ``torch.autocast("cuda", ...)`` becomes ``torch.autocast("cpu", ...)``;
* ``torch.cuda`` is :class:`_CpuCudaNamespace`: ``current_device()`` is the cpu device, ``synchronize`` /
  ``empty_cache`` do nothing, the "CUDA" RNG (``get_rng_state``/``set_rng_state``/``manual_seed``/
  ``default_generators``) is the CPU default generator (so megatron's RNG tracker forks the generator that CPU
  dropout actually draws from), ``Stream``/``Event``/``stream()`` are inert, and ``is_available()`` stays
  ``False`` so megatron's own "is there a GPU" decisions still see the truth.

Two tensor methods cannot be reached through a module global; they are swapped only *while one of the megatron
functions named below runs* (installed on entry, restored on exit, so torch is never left modified; not
thread-safe, which is fine because megatron builds models and optimizers on the main thread):

* ``Tensor.cuda()`` is the identity inside ``LanguageModule.setup_embeddings_and_output_layer`` (PP > 1 with tied
  embeddings moves the word-embedding copy to the GPU before its all-reduce);
* ``Tensor.type()`` (no argument) reports ``torch.cuda.FloatTensor``-style names inside the optimizer functions
  that dispatch on it (a CPU tensor says ``torch.FloatTensor`` and megatron raises ``TypeError``).

Sites patched (megatron-core 0.16.1, paths under ``megatron/core/``):

====================================================  ==========================================================
module                                                why
====================================================  ==========================================================
tensor_parallel/random.py                             CUDA RNG tracker (``model_parallel_cuda_manual_seed``,
                                                      every attention/dropout fork); also its module globals
                                                      ``_lazy_call`` (would queue the RNG set until a CUDA init
                                                      that never comes), ``_lazy_init`` and
                                                      ``device_ctx_manager``
tensor_parallel/layers.py                             weight/grad buffers on ``current_device()``
tensor_parallel/mappings.py                           gather/reduce-scatter outputs on ``current_device()``
utils.py                                              ``GlobalMemoryBuffer`` (every local-spec attention forward)
models/common/embeddings/rotary_pos_embedding.py      ``inv_freq`` moved to ``current_device()`` (RoPE)
models/common/language_module/language_module.py      ``weight.data.cuda()`` for tied embeddings with PP > 1
                                                      (scoped ``Tensor.cuda`` identity, see above)
transformer/utils.py                                  ``get_default_causal_mask`` builds the mask on cuda
transformer/attention.py, dot_product_attention.py,   buffers on ``current_device()``
transformer/transformer_layer.py
pipeline_parallel/schedules.py                        ``torch.zeros(..., device="cuda")`` in all three schedules,
                                                      ``torch.autocast("cuda")``
pipeline_parallel/p2p_communication.py                receive buffers on ``current_device()``, ``synchronize``
distributed/param_and_grad_buffer.py                  grad buffers, communication streams
distributed/distributed_data_parallel.py              ``torch.cuda.Stream``, ``synchronize``, ``empty_cache``
optimizer/optimizer.py                                cuda scalars (``found_inf``, scale); ``param.type()``
                                                      dispatch in ``Float16OptimizerWithFloat16Params.__init__``
optimizer/distrib_optimizer.py                        buffers on ``current_device()``; ``param.type()`` dispatch
                                                      in ``DistributedOptimizer.__init__`` and
                                                      ``_build_model_and_main_param_groups``
optimizer/clip_grads.py                               cuda scalars; ``grad.type()`` assertion in
                                                      ``clip_grad_by_total_norm_fp32`` (also rebound where
                                                      optimizer.py imported it by name)
dist_checkpointing/strategies/filesystem_async.py     ``torch.cuda.synchronize()`` before a save
dist_checkpointing/strategies/state_dict_saver.py     cuda flag tensors in the save-plan all-reduce
====================================================  ==========================================================

Two more workarounds, for megatron's torch-Adam fallback (no Apex, no TE: always the case on CPU), are called by
the checkpoint loader around ``dist_checkpointing.load``: :func:`materialise_fresh_adam_state` and
:func:`restore_adam_steps` (see their docstrings; they do nothing when megatron has Apex or TE).

One private megatron internal that is not about CUDA lives here too: :func:`stop_checkpoint_writer_manager` shuts
down the spawn-context ``Manager`` behind ``dist_checkpointing``'s async-writer result queue (module global
``_results_queue``), which ``oapl-convert``'s spawned ranks stop before skipping interpreter teardown.

Use::

    from oapl_megatron.parallel.cpu_compat import apply_cpu_compat
    apply_cpu_compat()   # idempotent; a no-op when torch.cuda.is_available()

:func:`oapl_megatron.parallel.bootstrap.init_distributed` calls it; other code should not need to. Another
megatron-core version fails loudly (:func:`check_megatron_version`) because every site above is version-specific.
Nothing here depends on ``TORCHDYNAMO_DISABLE``: the model builder turns off the fused (torch.compile'd) paths.

Exercised by tests/test_model_build.py: TP1PP1 build/forward/backward with and without an explicit mask and with
dropout, DDP + DistributedOptimizer (fp32) and Float16 optimizer (bf16), and on 4 ranks TP2PP2 and TP1PP2/VPP2
(p2p, all schedules, tied embeddings across stages) with ``TORCHDYNAMO_DISABLE=0``. The dist_checkpointing sites
were checked by hand (torch_dist save + load of a TP1PP1 model restores it exactly), not by a test here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from typing import Any, Callable

import torch

SUPPORTED_MEGATRON_VERSION = "0.16.1"

# Modules whose global ``torch`` is replaced by the proxy (see the table in the module docstring).
PATCHED_MODULES: tuple[str, ...] = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

_MARK = "__oapl_cpu_compat__"
_CPU = torch.device("cpu")
_lock = threading.Lock()
_applied = False


def check_megatron_version(version: str) -> None:
    """Raise RuntimeError unless ``version`` is the megatron-core version this module was written for."""
    if version != SUPPORTED_MEGATRON_VERSION:
        raise RuntimeError(
            f"oapl_megatron.parallel.cpu_compat was written for megatron-core {SUPPORTED_MEGATRON_VERSION} and "
            f"megatron-core {version} is installed; its CUDA sites differ between versions. Install "
            f"megatron-core=={SUPPORTED_MEGATRON_VERSION} or re-audit the sites listed in this module's docstring."
        )


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's factory API.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(fn: Callable) -> Callable:
    """Wrap a torch factory so that a CUDA ``device=`` becomes cpu and ``pin_memory`` is dropped."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


_FACTORIES = (
    "zeros", "zeros_like", "empty", "empty_like", "empty_strided", "ones", "ones_like", "full", "full_like",
    "tensor", "as_tensor", "arange", "range", "linspace", "logspace", "eye", "rand", "rand_like", "randn",
    "randn_like", "randint", "randint_like", "randperm", "frombuffer", "scalar_tensor",
)


class _InertStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: every method is a no-op (CPU work is synchronous)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _InertStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


class _CpuGenerators:
    """``torch.cuda.default_generators[i]`` → the CPU default generator, for any index."""

    def __getitem__(self, idx):
        return torch.default_generator

    def __len__(self):
        return 1


class _CpuCudaRandom:
    """``torch.cuda.random``: the CUDA RNG API served by the CPU default generator."""

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed


class _CpuCudaNamespace:
    """What ``torch.cuda`` means inside a patched megatron module; anything not listed comes from real torch.cuda."""

    random = _CpuCudaRandom()
    default_generators = _CpuGenerators()
    get_rng_state = staticmethod(_CpuCudaRandom.get_rng_state)
    set_rng_state = staticmethod(_CpuCudaRandom.set_rng_state)
    manual_seed = staticmethod(_CpuCudaRandom.manual_seed)
    manual_seed_all = staticmethod(_CpuCudaRandom.manual_seed)
    Stream = _InertStream
    Event = _InertStream

    @staticmethod
    def is_available() -> bool:
        return False  # megatron's own CPU/GPU decisions keep seeing the truth

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def device_count() -> int:
        return 0

    @staticmethod
    def synchronize(*args, **kwargs) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def current_stream(*args, **kwargs) -> _InertStream:
        return _InertStream()

    default_stream = current_stream

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def device(*args, **kwargs):
        return contextlib.nullcontext()

    @staticmethod
    def memory_allocated(*args, **kwargs) -> int:
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated
    max_memory_reserved = memory_allocated

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchCpuProxy:
    """What the name ``torch`` means inside a patched megatron module (see the module docstring)."""

    def __init__(self):
        for name in _FACTORIES:
            if hasattr(torch, name):
                setattr(self, name, _cpu_factory(getattr(torch, name)))
        self.cuda = _CpuCudaNamespace()

    @staticmethod
    def autocast(device_type: str, *args, **kwargs):
        return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set above; everything else is real torch (types, dtypes, distributed, nn).
        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<oapl_megatron cpu_compat proxy of torch>"


_TORCH_PROXY = _TorchCpuProxy()

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
}


@contextlib.contextmanager
def _scoped_tensor_method(name: str, replacement: Callable):
    """Swap one ``torch.Tensor`` method for the duration of a megatron call, then restore it."""
    original = getattr(torch.Tensor, name)
    setattr(torch.Tensor, name, replacement(original))
    try:
        yield
    finally:
        setattr(torch.Tensor, name, original)


def _cuda_identity(original):
    def cuda(self, *args, **kwargs):
        return self

    return cuda


def _cuda_type_names(original):
    def type_(self, dtype=None, *args, **kwargs):
        if dtype is None and not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, dtype, *args, **kwargs)

    return type_


def _wrap_with(fn: Callable, method: str, replacement: Callable) -> Callable:
    if getattr(fn, _MARK, False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _scoped_tensor_method(method, replacement):
            return fn(*args, **kwargs)

    setattr(wrapper, _MARK, True)
    return wrapper


def _patch_method(cls: type, attr: str, method: str, replacement: Callable) -> None:
    raw = cls.__dict__[attr]
    if isinstance(raw, classmethod):
        setattr(cls, attr, classmethod(_wrap_with(raw.__func__, method, replacement)))
    elif isinstance(raw, staticmethod):
        setattr(cls, attr, staticmethod(_wrap_with(raw.__func__, method, replacement)))
    else:
        setattr(cls, attr, _wrap_with(raw, method, replacement))


def _immediate_lazy_call(callable_: Callable, **kwargs) -> None:
    # torch.cuda._lazy_call queues the callable until CUDA initialises, which never happens on CPU.
    callable_()


def _apply() -> None:
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        current = getattr(module, "torch", None)
        if current is not torch and not isinstance(current, _TorchCpuProxy):
            raise RuntimeError(f"cpu_compat: {name} has no module-global 'torch' to rebind; re-audit the site list")
        module.torch = _TORCH_PROXY

    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._lazy_call = _immediate_lazy_call
    random_mod._lazy_init = lambda: None
    random_mod.device_ctx_manager = lambda *a, **k: contextlib.nullcontext()

    from megatron.core.models.common.language_module.language_module import LanguageModule

    _patch_method(LanguageModule, "setup_embeddings_and_output_layer", "cuda", _cuda_identity)

    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    _patch_method(optimizer.Float16OptimizerWithFloat16Params, "__init__", "type", _cuda_type_names)
    _patch_method(distrib_optimizer.DistributedOptimizer, "__init__", "type", _cuda_type_names)
    _patch_method(
        distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups", "type", _cuda_type_names
    )
    wrapped_clip = _wrap_with(clip_grads.clip_grad_by_total_norm_fp32, "type", _cuda_type_names)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped_clip
    optimizer.clip_grad_by_total_norm_fp32 = wrapped_clip  # imported by name there


def apply_cpu_compat() -> bool:
    """Patch megatron-core for a CPU-only torch. Idempotent; returns True if the patches are (now) active.

    Does nothing (returns False) when CUDA is available. Raises RuntimeError on a megatron-core version other than
    :data:`SUPPORTED_MEGATRON_VERSION`.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    import megatron.core

    check_megatron_version(megatron.core.__version__)
    with _lock:
        if not _applied:
            _apply()
            _applied = True
    return True


def is_applied() -> bool:
    """Whether :func:`apply_cpu_compat` has patched megatron-core in this process."""
    return _applied


# ------------------------------------------------------------------ the torch-Adam fallback (no Apex, no TE)
# Without Apex or Transformer Engine, megatron-core's DistributedOptimizer wraps a plain torch Adam, and two of
# its checkpoint paths assume the fused Adam's state layout. trainer/checkpoint/load.py calls these around
# dist_checkpointing.load; they do nothing when megatron has Apex or TE. Exercised by tests/test_checkpoint.py
# (resume gives bitwise-identical Adam state and next steps at TP1 and TP2, and with the DP size changed).


def _torch_adam_fallback():
    """megatron's distrib_optimizer module when it uses the torch-Adam fallback (checked version), else None."""
    import megatron.core
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return None
    check_megatron_version(megatron.core.__version__)
    return distrib_optimizer


def _inner_optimizers(optimizer) -> list:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def materialise_fresh_adam_state(optimizer) -> None:
    """Give a never-stepped torch Adam the state of step 0 (zero moments, step 0) so it can be loaded into.

    megatron-core 0.16.1 without Apex/TE (always the case on CPU): ``DistributedOptimizer.state_dict()``
    reads the step count from the inner torch Adam's per-parameter state (``assert len(steps) == 1``), and
    ``sharded_state_dict(is_loading=True)`` calls it before loading, so loading into a fresh optimizer fails.
    Zero moments at step 0 are exactly what torch Adam creates lazily on its first step, so this changes nothing
    but the allocation time; the load then overwrites every value.
    """
    distrib_optimizer = _torch_adam_fallback()
    if distrib_optimizer is None:
        return
    for inner in _inner_optimizers(optimizer):
        if len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def restore_adam_steps(optimizer, loaded: dict) -> None:
    """Set every parameter's torch-Adam ``step`` to the checkpoint's step count, one tensor per parameter.

    megatron-core 0.16.1 without Apex/TE: the dp_reshardable load copies each parameter's
    ``step`` from a non-persistent placeholder that holds the *pre-load* value, and ``load_state_dict`` gives all
    parameters one shared step tensor (torch Adam increments it in place once per parameter). The step count
    itself is saved correctly, in ``param_groups[i]["step"]`` of the optimizer's common state.
    """
    distrib_optimizer = _torch_adam_fallback()
    if distrib_optimizer is None:
        return
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(chained) == 1:
        per_opt = [loaded]
    else:
        per_opt = [v for _, v in sorted(loaded.items())]
    for opt, sd in zip(chained, per_opt):
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer):
            continue
        steps = {g["step"] for g in sd["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            raise ValueError(f"optimizer state has step counts {sorted(steps)}; expected one")
        step = float(steps.pop())
        for st in opt.optimizer.state.values():
            st["step"] = torch.full_like(st["step"], step) if torch.is_tensor(st.get("step")) \
                else torch.tensor(step, dtype=torch.float32)


# ------------------------------------------------------------------ dist_checkpointing's result-queue Manager

_FILESYSTEM_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"


def stop_checkpoint_writer_manager() -> bool:
    """Shut down the Manager process behind megatron's checkpoint-writer result queue, if one was started.

    megatron-core 0.16.1 ``dist_checkpointing/strategies/filesystem_async.py`` starts a spawn-context
    ``multiprocessing.Manager`` on the first save of a process and keeps its queue in the module global
    ``_results_queue`` (the Manager is reachable only as the queue proxy's ``_manager``). A process that ends
    with ``os._exit`` (skipping interpreter teardown) would orphan it. The global is reset, so a later save in
    this process starts a fresh Manager. Returns whether a Manager was stopped; raises RuntimeError on another
    megatron-core version once a save has started one (the internals are version-specific).
    """
    import sys

    module = sys.modules.get(_FILESYSTEM_ASYNC)
    queue = getattr(module, "_results_queue", None)
    if queue is None:
        return False  # no save in this process (or the module is not even imported)
    import megatron.core

    check_megatron_version(megatron.core.__version__)
    manager = getattr(queue, "_manager", None)
    module._results_queue = None
    if manager is None:
        return False
    manager.shutdown()
    return True
