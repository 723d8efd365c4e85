"""Engine server processes on this host: spawning, readiness, stopping, and shutdown on exit or SIGTERM.

In ``local`` mode the engine group spawns one server per engine with :func:`spawn_engine_server`: the server runs
``python -m oapl_megatron.entrypoints.engine_server`` in its own session (so a stop reaches vLLM's children too), dies
with the trainer (``PR_SET_PDEATHSIG``), logs to ``log_dir/engine{i}.log`` and writes ``engine{i}.ready.json``
(host, port, pid) once vLLM is up. :func:`stop_process` stops one: polite exit → SIGTERM → SIGKILL of its process
group. Live groups registered with :func:`register_group` are shut down at interpreter exit and on SIGTERM, so no
engine outlives its trainer.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import weakref
from dataclasses import asdict
from pathlib import Path

from oapl_megatron.rollout.engine_server import AUTHKEY_ENV, EngineSpec

REPO_ROOT = Path(__file__).resolve().parents[2]


def engine_spec(model: str, rollout, engine_id: int) -> EngineSpec:
    """The spec of engine ``engine_id`` of a :class:`~oapl_megatron.config.rollout.RolloutConfig`."""
    return EngineSpec(model=model, engine_id=engine_id, tp=rollout.engine_tp, dtype=rollout.dtype,
                      max_model_len=rollout.max_model_len, kv_cache_bytes=rollout.kv_cache_bytes,
                      enforce_eager=rollout.enforce_eager, gpu_memory_utilization=rollout.gpu_memory_utilization,
                      seed=rollout.seed)


def spawn_engine_server(spec: EngineSpec, log_dir: Path, authkey: bytes, *,
                        cuda_visible_devices: str | None = None) -> tuple[subprocess.Popen, Path, Path]:
    """Start the server of ``spec.engine_id``; returns (process, ready file, log file). Must be called from the
    thread that lives as long as the engine should: ``PR_SET_PDEATHSIG`` fires when the *spawning thread* exits.
    ``cuda_visible_devices``: the GPUs this engine may use (None = inherit the trainer's environment)."""
    i = spec.engine_id
    env = dict(os.environ)
    env[AUTHKEY_ENV] = authkey.hex()
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    spec_path = log_dir / f"engine{i}.spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    ready = log_dir / f"engine{i}.ready.json"
    ready.unlink(missing_ok=True)
    log = log_dir / f"engine{i}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "oapl_megatron.entrypoints.engine_server", "--spec", str(spec_path),
             "--ready-file", str(ready), "--parent-pid", str(os.getpid())],
            stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, ready, log


def stop_process(proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait for a polite exit, then SIGTERM, then SIGKILL of the process and its process group."""
    for sig, wait in ((None, timeout_s / 2), (signal.SIGTERM, timeout_s / 2), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        if sig is not None:
            try:
                os.killpg(proc.pid, sig)  # the server leads its own session: this reaches vLLM's children too
            except ProcessLookupError:
                break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    try:  # children that outlived the leader (multiprocess vLLM) share its process group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# Live groups, shut down at interpreter exit and on SIGTERM (SIGINT raises KeyboardInterrupt → atexit).
_LIVE_GROUPS: "weakref.WeakSet" = weakref.WeakSet()
_HANDLERS_INSTALLED = False


def _shutdown_all() -> None:
    for g in list(_LIVE_GROUPS):
        g.shutdown()


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_shutdown_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit + PDEATHSIG still hold
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        _shutdown_all()
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def register_group(group) -> None:
    """Shut ``group`` down at interpreter exit and on SIGTERM (until :func:`unregister_group`)."""
    _install_handlers()
    _LIVE_GROUPS.add(group)


def unregister_group(group) -> None:
    _LIVE_GROUPS.discard(group)

