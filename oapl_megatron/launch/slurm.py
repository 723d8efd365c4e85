"""Render (and submit) the heterogeneous Slurm batch script of a run from ``launch/templates/slurm_hetjob.sh``.

The template holds the shell; this module fills ``{{name}}`` placeholders from a resolved
:class:`~oapl_megatron.config.schema.RunConfig` and its :mod:`placement <oapl_megatron.launch.placement>`. The
resolved config is embedded in the script, so the printed script is everything a user needs to keep, edit and
``sbatch``::

    cfg = load_config(RunConfig, "configs/demo.yaml", ["launch.trainer_nodes=1"])
    text = render(cfg, header="...")
    job_id = submit(text, cfg)               # writes <log_root>/job.sbatch, runs sbatch, returns the job id
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from oapl_megatron.config.loader import ConfigError, to_yaml
from oapl_megatron.launch.placement import ClusterPlacement, place_cluster

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "launch" / "templates" / "slurm_hetjob.sh"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{name}}``; a placeholder without a value (or a value without a placeholder) is a bug."""
    names = set(_PLACEHOLDER.findall(template))
    missing, unused = names - set(values), set(values) - names
    if missing or unused:
        raise ValueError(f"{TEMPLATE.name}: placeholders without values {sorted(missing)}, values without "
                         f"placeholders {sorted(unused)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def log_root(cfg) -> Path:
    """Where the job's logs go: ``launch.log_dir`` or ``<run_dir>/slurm`` (absolute)."""
    root = cfg.launch.log_dir if cfg.launch.log_dir is not None else Path(cfg.run_dir) / "slurm"
    return Path(root).absolute()


def cluster_config(cfg):
    """The config the job's steps run: engines attach by registration; paths absolute (steps start elsewhere)."""
    out = cfg.model_copy(deep=True)
    out.rollout.mode = "cluster"
    out.rollout.addresses = []
    out.run_dir = Path(cfg.run_dir).absolute()
    if out.model.hf_path is not None and not Path(out.model.hf_path).is_absolute() \
            and not _looks_like_hub_id(out.model.hf_path):
        out.model.hf_path = str(Path(out.model.hf_path).absolute())
    if out.checkpoint.dir is not None:
        out.checkpoint.dir = Path(out.checkpoint.dir).absolute()
    return out


def _looks_like_hub_id(path: str) -> bool:
    return not Path(path).exists() and path.count("/") == 1 and not path.startswith((".", "/"))


def _sbatch_lines(cfg, nodes: int, gpus: int, cpus: int, ntasks_per_node: int) -> list[str]:
    s = cfg.launch.slurm
    opts = [f"--nodes={nodes}", f"--ntasks-per-node={ntasks_per_node}", f"--time={s.time_limit}"]
    if gpus:
        opts.append(f"--gpus-per-node={gpus}")
    if cpus:
        opts.append(f"--cpus-per-task={cpus}")
    if s.exclusive:
        opts.append("--exclusive")
    if s.partition:
        opts.append(f"--partition={s.partition}")
    if s.account:
        opts.append(f"--account={s.account}")
    opts.extend(s.extra_sbatch)
    return [f"#SBATCH {o}" for o in opts]


def render(cfg, header: str = "rendered by oapl-launch slurm", python: str | None = None,
           workdir: Path | None = None) -> str:
    """The batch script for ``cfg``. Raises ConfigError when the layout does not fit (names the fields)."""
    lc, s, cont = cfg.launch, cfg.launch.slurm, cfg.launch.container
    place: ClusterPlacement = place_cluster(cfg)
    job_cfg = cluster_config(cfg)
    root = log_root(cfg)
    gpus = lc.gpus_per_node
    if cont.image and cont.runtime == "pyxis":
        mounts = [f"{REPO}:{REPO}", f"{job_cfg.run_dir}:{job_cfg.run_dir}", *cont.mounts]
        srun_container = (f"--container-image={shlex.quote(cont.image)} --container-mounts={','.join(mounts)} "
                          f"--container-workdir={REPO}")
        run_prefix = ""
    elif cont.image:
        binds = ",".join([str(REPO), str(job_cfg.run_dir), *cont.mounts])
        srun_container = ""
        run_prefix = f"apptainer exec {'--nv ' if gpus else ''}--bind {binds} {shlex.quote(cont.image)}"
    else:
        srun_container = run_prefix = ""
    # Inside a container the image's python runs the code; outside, the interpreter that rendered the script.
    py = "python" if cont.image else (python or sys.executable)
    env = []
    if not gpus:  # CPU nodes: one thread per rank/engine (more oversubscribes), no torch.compile start-up cost
        env += ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}", "export TORCHDYNAMO_DISABLE=1"]
    # Each component may hold a single node type (het jobs can mix partitions; ours are identical).
    values = {
        "header": header,
        "job_name": s.job_name,
        "log_root": str(root),
        "signal_grace_s": str(s.signal_grace_s),
        "requeue": "--requeue" if s.requeue else "--no-requeue",
        "requeue_on": "1" if s.requeue else "0",
        "max_restarts": str(s.max_restarts),
        "sbatch_trainer": "\n".join(_sbatch_lines(cfg, lc.trainer_nodes, gpus, s.cpus_per_trainer_node, 1)),
        "sbatch_engines": "\n".join(_sbatch_lines(cfg, lc.engine_nodes, gpus, s.cpus_per_engine,
                                                  place.engines_per_node)),
        "workdir": shlex.quote(str(workdir or Path.cwd())),
        "run_dir": shlex.quote(str(job_cfg.run_dir)),
        "python": shlex.quote(py),
        "pythonpath": shlex.quote(str(REPO)),
        "config_yaml": to_yaml(job_cfg).rstrip("\n"),
        "setup": "\n".join(s.setup) if s.setup else "# (no launch.slurm.setup lines)",
        "env": "\n".join(env) if env else "# (GPU nodes: no extra environment)",
        "rdzv_port": str(lc.rdzv_port),
        "placement": place.describe(),
        "srun_container": srun_container,
        "run_prefix": run_prefix,
        "preflight": "true" if lc.preflight else "false",
        "preflight_slow_ratio": str(lc.preflight_slow_ratio),
        "preflight_fail_slow": "--fail-slow" if lc.preflight_fail_slow else "",
        "engine_nodes": str(lc.engine_nodes),
        "engines_per_node": str(place.engines_per_node),
        "engines": str(cfg.rollout.engines),
        # every step sees all of its node's GPUs; the engines pick theirs by the placement rule
        "step_gpus": f"--gpus-per-node={gpus}" if gpus else "",
        "trainer_nodes": str(lc.trainer_nodes),
        "trainer_ranks_per_node": str(place.trainer_ranks_per_node),
    }
    if "OAPL_CONFIG_EOF" in values["config_yaml"]:
        raise ConfigError("the config contains the text OAPL_CONFIG_EOF, which ends the embedded config early")
    return fill(TEMPLATE.read_text(), values)


def submit(script: str, cfg, sbatch: str = "sbatch") -> int:
    """Write the script to ``<log_root>/job.sbatch`` and submit it; return the job id."""
    root = log_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return int(proc.stdout.strip().split(";")[0])
