"""The ``launch`` config section: how a run is laid out on a cluster (nodes, GPUs, Slurm, container, pre-flight).

Read by ``oapl-launch`` (:mod:`oapl_megatron.entrypoints.launch`) and by the per-node helpers it renders into the
batch script; the trainer itself ignores it. The placement rule that turns it into GPU lists lives in
:mod:`oapl_megatron.launch.placement`::

    launch:
      gpus_per_node: 8        # 0 on CPU nodes
      trainer_nodes: 2
      engine_nodes: 1
      slurm: {partition: gpu, time_limit: "04:00:00"}

Command-line flags of ``oapl-launch slurm`` (``--trainer-nodes`` …) are dotted overrides of these fields.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from oapl_megatron.config.base import StrictModel


class ContainerConfig(StrictModel):
    """Run every step of the job in a container image (optional)."""

    image: str | None = Field(None, description="image: pyxis/enroot name (`nvcr.io#nvidia/pytorch:25.01-py3`, a "
                                                ".sqsh file) or an apptainer .sif; None = no container")
    runtime: Literal["pyxis", "apptainer"] = Field(
        "pyxis", description="pyxis: `srun --container-image`; apptainer: `apptainer exec --nv IMAGE` per step")
    mounts: list[str] = Field(default_factory=list, description="extra `SRC:DST` bind mounts (the repository and "
                                                                "the run directory are always mounted)")


class SlurmConfig(StrictModel):
    """``#SBATCH`` settings of the heterogeneous job."""

    partition: str | None = Field(None, description="partition of both components; None = the cluster default")
    account: str | None = Field(None, description="account to charge; None = the user's default")
    time_limit: str = Field("04:00:00", description="wall-clock limit per attempt, [D-]HH:MM:SS")
    job_name: str = Field("oapl", description="job name")
    cpus_per_trainer_node: int = Field(0, ge=0, description="CPUs per trainer node; 0 = let Slurm decide "
                                                            "(whole node with --exclusive on GPU clusters)")
    cpus_per_engine: int = Field(0, ge=0, description="CPUs per engine server task; 0 = let Slurm decide")
    exclusive: bool = Field(True, description="ask for whole nodes (`--exclusive`); off for the local test cluster")
    requeue: bool = Field(True, description="requeue the job after a preemption signal (resumes with --resume)")
    max_restarts: int = Field(10, ge=0, le=1000, description="give up requeueing after this many attempts")
    signal_grace_s: int = Field(
        600, ge=10, le=86400, description="SIGTERM to the batch shell this long before the time limit "
                                          "(`--signal=B:TERM@N`): must cover loop.lag steps plus one checkpoint")
    engine_start_timeout_s: float = Field(1800.0, gt=0, description="how long the trainer waits for every engine to "
                                                                    "register in the run directory")
    extra_sbatch: list[str] = Field(default_factory=list, description="extra `#SBATCH` lines for both components, "
                                                                      "e.g. ['--qos=high']")
    setup: list[str] = Field(default_factory=list, description="shell lines run before every step, e.g. "
                                                               "['source .venv/bin/activate', 'module load cuda']")

    @field_validator("time_limit")
    @classmethod
    def _time(cls, v: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}:\d{2}", v):
            raise ValueError(f"launch.slurm.time_limit={v!r}: use [D-]HH:MM:SS, e.g. 04:00:00 or 1-00:00:00")
        return v


class LaunchConfig(StrictModel):
    """Nodes and GPUs of a run: trainer nodes (torchrun) + engine nodes (one engine server per GPU group)."""

    gpus_per_node: int = Field(0, ge=0, le=64, description="GPUs per node; 0 = CPU nodes (no GPU assignment)")
    trainer_nodes: int = Field(1, ge=1, le=4096, description="nodes of the trainer component (het group 0)")
    engine_nodes: int = Field(1, ge=0, le=4096, description="nodes of the engine component (het group 1); 0 = "
                                                            "engines share the trainer's node (local launch only)")
    trainer_ranks_per_node: int | None = Field(
        None, ge=1, le=256, description="torchrun --nproc-per-node; None = gpus_per_node on GPU, tp×pp on CPU")
    engines_per_node: int | None = Field(
        None, ge=1, le=256, description="engine servers per engine node; None = gpus_per_node // engine_tp on "
                                        "GPU, 1 on CPU")
    rdzv_port: int = Field(29400, ge=1024, le=65000, description="base TCP port of the torchrun rendezvous (the "
                                                                 "job id is added modulo 1000)")
    preflight: bool = Field(True, description="GEMM + collective check on every node before training")
    preflight_slow_ratio: float = Field(0.5, gt=0, le=1, description="a node whose GEMM rate is below this "
                                                                     "fraction of the median is reported slow")
    preflight_fail_slow: bool = Field(False, description="abort the job when a node is slow (failing nodes "
                                                         "always abort)")
    log_dir: Path | None = Field(None, description="job logs; None = <run_dir>/slurm (one folder per attempt)")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="#SBATCH settings")
    container: ContainerConfig = Field(default_factory=ContainerConfig, description="optional container")
