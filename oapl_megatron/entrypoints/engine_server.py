"""``python -m oapl_megatron.entrypoints.engine_server``: serve one vLLM engine over the oapl control plane.

The process role of an inference engine (local mode: spawned by the trainer; cluster mode: started on an inference
node). Parses arguments, then hands the spec to :class:`oapl_megatron.rollout.engine_server.EngineServer`; see that
module for the protocol and the two modes. As a task of a Slurm job (``oapl-launch slurm``)::

    srun ... python -m oapl_megatron.entrypoints.engine_server --config CONFIG --register-dir RUN_DIR/engines/registry

builds its spec from the run config, takes engine id ``SLURM_PROCID`` and its GPUs from the placement rule
(:mod:`oapl_megatron.launch.slurm_task`), binds on this node's address and registers ``{host, port, pid}`` in
``<register-dir>/engine<i>.json`` once vLLM is up; it exits when the trainer disconnects. The authkey comes from ``OAPL_ENGINE_AUTHKEY`` (hex), never from the
command line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
from pathlib import Path

from oapl_megatron.rollout.engine_server import AUTHKEY_ENV


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the parent dies (Linux); then close the race where it already died."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the connection-closed exit below still applies
    if os.getppid() != parent_pid:
        os._exit(1)


def _slurm_task(config: str, register_dir: Path) -> tuple[str, str, str]:
    """Spec path, bind address and registration file of this Slurm task; sets its CUDA_VISIBLE_DEVICES before vLLM
    (and torch) are imported."""
    from dataclasses import asdict

    from oapl_megatron.config.loader import load_config
    from oapl_megatron.config.schema import RunConfig
    from oapl_megatron.launch.slurm_task import engine_task, node_address
    from oapl_megatron.rollout.engine_process import engine_spec

    cfg = load_config(RunConfig, config)
    engine_id, env = engine_task(cfg, os.environ)
    os.environ.update(env)
    print(f"engine {engine_id}: {env or 'CPU node, no GPU assignment'}", flush=True)
    register_dir.mkdir(parents=True, exist_ok=True)
    spec_path = register_dir.parent / f"engine{engine_id}.spec.json"
    spec_path.write_text(json.dumps(asdict(engine_spec(str(cfg.model.hf_path), cfg.rollout, engine_id))))
    return str(spec_path), node_address(), str(register_dir / f"engine{engine_id}.json")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve one vLLM engine over the oapl control plane.")
    ap.add_argument("--spec", default=None, help="engine spec JSON (see EngineSpec)")
    ap.add_argument("--config", default=None, help="Slurm task: the run config (instead of --spec)")
    ap.add_argument("--register-dir", default=None, help="Slurm task: register {host, port, pid} here when ready")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (reported in --ready-file)")
    ap.add_argument("--ready-file", default=None, help="local mode: write {host, port, pid} here when ready")
    ap.add_argument("--parent-pid", type=int, default=None, help="local mode: die with this parent")
    args = ap.parse_args(argv)
    if (args.spec is None) == (args.config is None):
        ap.error("give exactly one of --spec (local/cluster mode) and --config (a Slurm task)")
    if args.config is not None:
        if args.register_dir is None:
            ap.error("--config needs --register-dir (where the trainer looks for this engine)")
        args.spec, args.host, args.ready_file = _slurm_task(args.config, Path(args.register_dir))

    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    key_hex = os.environ.get(AUTHKEY_ENV)
    if not key_hex:
        sys.exit(f"engine server: set {AUTHKEY_ENV} (hex) to the control-plane authkey")
    # SIGTERM → SystemExit so vLLM's shutdown and our finally blocks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from multiprocessing.connection import Listener

    from oapl_megatron.rollout.engine_server import EngineServer, EngineSpec

    spec = EngineSpec.load(args.spec)
    server = EngineServer(spec)
    with Listener((args.host, args.port), authkey=bytes.fromhex(key_hex)) as listener:
        host, port = listener.address
        if args.ready_file:
            tmp = Path(args.ready_file + ".tmp")
            tmp.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}))
            tmp.replace(args.ready_file)  # atomic: the trainer never reads a half-written file
        print(f"engine {spec.engine_id} serving on {host}:{port} (pid {os.getpid()})", flush=True)
        server.serve(listener, once=args.ready_file is not None)


if __name__ == "__main__":
    main()
