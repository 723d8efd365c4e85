"""One engine server of a Slurm job's engine component: pick its id and GPUs, then serve and register.

Run by the batch script as ``srun --het-group=1 --ntasks-per-node=E``; task ``SLURM_PROCID`` is engine ``i``,
``SLURM_LOCALID`` picks its GPU group on the node (:func:`oapl_megatron.launch.placement.place_cluster`)::

    OAPL_ENGINE_AUTHKEY=<hex> python -m oapl_megatron.launch.engine_task CONFIG --registry RUN_DIR/engines/registry

It sets ``CUDA_VISIBLE_DEVICES`` before vLLM is imported, binds the control plane on this node's address and
writes ``{"host", "port", "pid"}`` atomically to ``<registry>/engine<i>.json`` once vLLM is up; the trainer
(``rollout.mode=cluster`` without addresses) waits for those files. The server exits when the trainer
disconnects (the trainer finishing stops the engines).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from dataclasses import asdict
from pathlib import Path


def node_address() -> str:
    """This node's address as other nodes reach it (the hostname's address; OAPL_ENGINE_HOST overrides)."""
    return os.environ.get("OAPL_ENGINE_HOST") or socket.gethostbyname(socket.gethostname())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="the job's resolved config (the batch script writes it)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides")
    ap.add_argument("--registry", required=True, type=Path, help="directory the trainer watches")
    args = ap.parse_args(argv)

    from oapl_megatron.config.loader import load_config
    from oapl_megatron.config.schema import RunConfig
    from oapl_megatron.launch.placement import parse_visible, place_cluster

    cfg = load_config(RunConfig, args.config, args.overrides)
    engine_id = int(os.environ.get("SLURM_PROCID", 0))
    local, node = int(os.environ.get("SLURM_LOCALID", 0)), int(os.environ.get("SLURM_NODEID", 0))
    if engine_id >= cfg.rollout.engines:
        sys.exit(f"engine task {engine_id}: the config has only rollout.engines={cfg.rollout.engines}")
    place = place_cluster(cfg)
    node_place = place.engine_node(node)
    # Slurm's GPU binding (--gpus-per-node) shows the allocated GPUs; our indices are positions in that list.
    node_place = type(node_place)(node_place.gpus, (), node_place.engine_gpus, node_place.first_engine_id,
                                  parse_visible(os.environ.get("CUDA_VISIBLE_DEVICES")))
    os.environ.update(node_place.engine_env(local))
    print(f"engine {engine_id} on {socket.gethostname()} (local task {local}): "
          f"{node_place.engine_env(local) or 'CPU, no GPU assignment'}", flush=True)

    from oapl_megatron.rollout.engine_server import EngineSpec, main as serve

    ro = cfg.rollout
    spec = EngineSpec(model=str(cfg.model.hf_path), engine_id=engine_id, tp=ro.engine_tp, dtype=ro.dtype,
                      max_model_len=ro.max_model_len, kv_cache_bytes=ro.kv_cache_bytes,
                      enforce_eager=ro.enforce_eager, gpu_memory_utilization=ro.gpu_memory_utilization,
                      seed=ro.seed)
    args.registry.mkdir(parents=True, exist_ok=True)
    spec_path = args.registry.parent / f"engine{engine_id}.spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    serve(["--spec", str(spec_path), "--host", node_address(), "--port", "0",
           "--ready-file", str(args.registry / f"engine{engine_id}.json")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
