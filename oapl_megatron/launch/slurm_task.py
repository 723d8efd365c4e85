"""Which engine a task of a Slurm job's engine component is, and which GPUs it gets (pure: config + environment).

The batch script starts ``srun --het-group=1 --ntasks-per-node=E python -m oapl_megatron.entrypoints.engine_server
--config CONFIG --register-dir RUN_DIR/engines/registry``; the server asks :func:`engine_task` for its engine id
(``SLURM_PROCID``) and its ``CUDA_VISIBLE_DEVICES`` (``SLURM_LOCALID``'s GPU group on the node, by
:func:`oapl_megatron.launch.placement.place_cluster`, mapped through the GPUs Slurm bound to the step), and
:func:`node_address` for the address it registers.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from typing import Mapping

from oapl_megatron.config.loader import ConfigError
from oapl_megatron.launch.placement import parse_visible, place_cluster


def engine_task(cfg, environ: Mapping[str, str]) -> tuple[int, dict[str, str]]:
    """(engine id, environment updates) of the Slurm task described by ``environ``."""
    engine_id = int(environ.get("SLURM_PROCID", 0))
    local, node = int(environ.get("SLURM_LOCALID", 0)), int(environ.get("SLURM_NODEID", 0))
    if engine_id >= cfg.rollout.engines:
        raise ConfigError(f"engine task {engine_id} (SLURM_PROCID) but rollout.engines={cfg.rollout.engines}")
    place = place_cluster(cfg).engine_node(node)
    if place.first_engine_id + local != engine_id:
        raise ConfigError(f"engine task {engine_id} is local task {local} of node {node}, but the placement puts "
                          f"engine {place.first_engine_id + local} there: launch.engines_per_node must match "
                          "srun --ntasks-per-node")
    # Slurm's GPU binding (--gpus-per-node) shows only the allocated GPUs: our indices are positions in that list.
    place = replace(place, visible=parse_visible(environ.get("CUDA_VISIBLE_DEVICES")))
    return engine_id, place.engine_env(local)


def node_address() -> str:
    """This node's address as other nodes reach it (its hostname's address; OAPL_ENGINE_HOST overrides)."""
    return os.environ.get("OAPL_ENGINE_HOST") or socket.gethostbyname(socket.gethostname())
