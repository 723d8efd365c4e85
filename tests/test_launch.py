"""Cluster launch without a cluster: the placement rule, the rendered Slurm batch script (field by field), the
pre-flight verdict, and the leftover cleanup. The real Slurm runs are in test_launch_slurm.py; the one-node
launcher's teardown is in test_launch_local.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from oapl_megatron.config.loader import ConfigError, load_config
from oapl_megatron.config.schema import RunConfig
from oapl_megatron.launch.placement import check_trainer_grid, place_cluster, place_node

REPO = Path(__file__).resolve().parents[1]


# ---- placement rule

@pytest.mark.parametrize("gpus,trainer,engines,tp,want_trainer,want_engines", [
    (4, 2, 2, 1, (0, 1), ((2,), (3,))),
    (4, 2, 1, 2, (0, 1), ((2, 3),)),
    (4, 3, 1, 1, (0, 1, 2), ((3,),)),
    (8, 4, 2, 2, (0, 1, 2, 3), ((4, 5), (6, 7))),
    (8, 4, 4, 1, (0, 1, 2, 3), ((4,), (5,), (6,), (7,))),
    (8, 6, 1, 2, tuple(range(6)), ((6, 7),)),
    (8, 0, 2, 4, (), ((0, 1, 2, 3), (4, 5, 6, 7))),     # an engine node: every GPU to the engines
    (8, 2, 1, 4, (0, 1), ((2, 3, 4, 5),)),              # GPUs 6, 7 stay idle (and the printout says so)
])
def test_placement_puts_trainer_first_and_engines_on_the_rest(gpus, trainer, engines, tp, want_trainer,
                                                              want_engines):
    p = place_node(gpus, trainer, engines, tp)
    assert p.trainer_gpus == want_trainer and p.engine_gpus == want_engines
    used = [g for grp in p.engine_gpus for g in grp] + list(p.trainer_gpus)
    assert len(used) == len(set(used))
    assert p.engine_env(engines - 1) == {"CUDA_VISIBLE_DEVICES": ",".join(map(str, want_engines[-1]))}
    text = p.describe()
    assert f"engine {engines - 1} → GPUs {','.join(map(str, want_engines[-1]))}" in text
    if gpus - trainer - engines * tp:
        assert "idle GPUs" in text


def test_placement_maps_through_the_visible_devices_and_explicit_devices():
    p = place_node(8, 4, 2, 2, devices=[6, 7, 4, 5], visible=tuple("abcdefgh"))
    assert p.engine_gpus == ((6, 7), (4, 5))
    assert p.engine_env(0) == {"CUDA_VISIBLE_DEVICES": "g,h"} and p.engine_env(1) == {"CUDA_VISIBLE_DEVICES": "e,f"}


def test_placement_on_cpu_assigns_nothing():
    p = place_node(0, 2, 3, 1)
    assert p.trainer_gpus == () and p.engine_gpus == ((), (), ()) and p.engine_env(2) == {}
    assert "CPU node" in p.describe()


@pytest.mark.parametrize("kwargs,fields", [
    (dict(gpus=4, trainer_ranks=4, engines=1, engine_tp=1), ["rollout.engines", "rollout.engine_tp"]),
    (dict(gpus=8, trainer_ranks=4, engines=3, engine_tp=2), ["rollout.engines=3", "rollout.engine_tp=2", "only 4"]),
    (dict(gpus=8, trainer_ranks=4, engines=2, engine_tp=1, devices=[3, 4]), ["rollout.devices", "overlaps", "[3]"]),
    (dict(gpus=4, trainer_ranks=2, engines=2, engine_tp=1, devices=[2, 2]), ["rollout.devices", "more than once"]),
    (dict(gpus=4, trainer_ranks=2, engines=1, engine_tp=1, devices=[7]), ["rollout.devices", "do not exist"]),
    (dict(gpus=4, trainer_ranks=2, engines=2, engine_tp=1, devices=[2]), ["rollout.devices has 1", "2 are needed"]),
    (dict(gpus=4, trainer_ranks=5, engines=0, engine_tp=1), ["5 trainer ranks", "4 GPUs"]),
    (dict(gpus=4, trainer_ranks=0, engines=1, engine_tp=8), ["rollout.engine_tp=8"]),
    (dict(gpus=0, trainer_ranks=2, engines=1, engine_tp=1, devices=[0]), ["rollout.devices", "no GPU"]),
])
def test_placement_errors_name_the_fields(kwargs, fields):
    with pytest.raises(ConfigError) as e:
        place_node(**kwargs)
    for f in fields:
        assert f in str(e.value)


@pytest.mark.parametrize("ranks,nodes,tp,pp,gpus,ok", [
    (8, 2, 2, 2, 8, True), (8, 1, 4, 2, 8, True), (8, 2, 8, 2, 8, True), (2, 1, 2, 1, 0, True),
    (4, 1, 3, 1, 4, False),    # 4 ranks are not a multiple of tp × pp
    (6, 2, 4, 1, 8, False),    # 12 ranks divisible by 4, but a TP group of 4 would straddle nodes of 6 ranks
    (8, 1, 2, 1, 4, False),    # more ranks than GPUs
])
def test_trainer_grid(ranks, nodes, tp, pp, gpus, ok):
    if ok:
        check_trainer_grid(ranks, nodes, tp, pp, gpus)
    else:
        with pytest.raises(ConfigError, match=r"parallel\.tp|trainer_ranks_per_node"):
            check_trainer_grid(ranks, nodes, tp, pp, gpus)


def test_overlap_is_a_config_error_when_the_config_is_resolved():
    with pytest.raises(ConfigError, match=r"rollout\.devices=\[1, 2\] overlaps the trainer's GPUs 0,1"):
        load_config(RunConfig, REPO / "configs" / "demo.yaml",
                    ["launch.gpus_per_node=4", "rollout.devices=[1,2]", "rollout.engines=2"])


def test_cluster_layout_checks_engine_count():
    cfg = load_config(RunConfig, REPO / "configs" / "qwen3_8b_math_multinode.yaml")
    p = place_cluster(cfg)
    assert (p.trainer_nodes, p.trainer_ranks_per_node, p.engine_nodes, p.engines_per_node) == (2, 8, 2, 8)
    assert p.engine_node(1).first_engine_id == 8
    with pytest.raises(ConfigError, match=r"rollout.engines=16 but launch.engine_nodes=1"):
        place_cluster(load_config(RunConfig, REPO / "configs" / "qwen3_8b_math_multinode.yaml",
                                  ["launch.engine_nodes=1"]))


def test_slurm_task_gets_its_engine_id_and_gpus():
    from oapl_megatron.launch.slurm_task import engine_task

    cfg = load_config(RunConfig, REPO / "configs" / "qwen3_8b_math_multinode.yaml",
                      ["rollout.engine_tp=2", "rollout.engines=8"])
    env = {"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert engine_task(cfg, env) == (6, {"CUDA_VISIBLE_DEVICES": "4,5"})
    with pytest.raises(ConfigError, match="ntasks-per-node"):
        engine_task(cfg, dict(env, SLURM_LOCALID="1"))


# ---- the rendered batch script

def _render(tmp_path, *extra):
    out = subprocess.run(
        [sys.executable, "-m", "oapl_megatron.entrypoints.launch", "slurm",
         str(REPO / "configs" / "qwen3_8b_math_multinode.yaml"), "--trainer-nodes", "1", "--engine-nodes", "1",
         "--gpus-per-node", "8", "rollout.engines=4", "rollout.engine_tp=2", "--partition", "gpu",
         "--dry-run", f"run_dir={tmp_path / 'run'}", *extra],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    return out.stdout


def _sbatch(script: str) -> tuple[list[str], list[str], list[str]]:
    """(header lines before the first component's geometry, component 0 lines, component 1 lines)."""
    lines = [ln[len("#SBATCH "):] for ln in script.splitlines() if ln.startswith("#SBATCH ")]
    cut = lines.index("hetjob")
    return lines[:cut], lines[cut + 1:]


def _opts(lines):
    return dict(ln.split("=", 1) if "=" in ln else (ln, True) for ln in lines)


def test_dry_run_script_for_two_gpu_nodes_field_by_field(tmp_path):
    script = _render(tmp_path, "--container-image", "nvcr.io#nvidia/pytorch:25.01-py3")
    comp0, comp1 = (_opts(c) for c in _sbatch(script))
    # component 0 = the trainer node, component 1 = the engine node; both whole 8-GPU nodes in partition gpu
    assert comp0["--nodes"] == "1" and comp0["--ntasks-per-node"] == "1" and comp0["--gpus-per-node"] == "8"
    assert comp1["--nodes"] == "1" and comp1["--ntasks-per-node"] == "4" and comp1["--gpus-per-node"] == "8"
    for c in (comp0, comp1):
        assert c["--partition"] == "gpu" and c["--exclusive"] is True and c["--time"] == "04:00:00"
    # preemption: SIGTERM to the batch shell 900 s before the limit, requeue, per-attempt logs
    assert comp0["--signal"] == "B:TERM@900" and comp0["--requeue"] is True
    assert comp0["--output"] == f"{tmp_path / 'run' / 'slurm'}/job-%j.out"
    assert 'LOG="$LOG_ROOT/attempt-$ATTEMPT"' in script and "ATTEMPT=${SLURM_RESTART_COUNT:-0}" in script
    # het groups: engines in group 1 (4 servers of 2 GPUs), torchrun in group 0 with a c10d rendezvous at the head
    eng = re.search(r'"\$\{STEP\[@\]\}" --het-group=1 (.*?) &\n', script, re.S).group(1)
    assert "--nodes=1 --ntasks-per-node=4" in eng and "entrypoints.engine_server --config" in eng
    assert '--cpus-per-task="$ENGINE_CPUS" --gpus-per-node=8' in eng
    assert '--register-dir "$RUN_DIR/engines/registry"' in eng
    tr = re.search(r'"\$\{STEP\[@\]\}" --het-group=0 (.*?) &\n', script, re.S).group(1)
    for piece in ('--cpus-per-task="$TRAINER_CPUS"', "--gpus-per-node=8", "--nnodes=1 --nproc-per-node=8", "--rdzv-backend=c10d", '--rdzv-endpoint="$HEAD_ADDR:$RDZV_PORT"',
                  '--rdzv-id="oapl_$SLURM_JOB_ID"', "entrypoints.train", 'weight_sync.host="$HEAD_ADDR"',
                  '"${RESUME[@]}"'):
        assert piece in tr, piece
    assert "HEAD=$(scontrol show hostnames \"$SLURM_JOB_NODELIST_HET_GROUP_0\" | head -n 1)" in script
    assert '[[ $ATTEMPT -gt 0 ]] && RESUME=(--resume)' in script
    # container: every step through pyxis, with the repository and the run directory mounted
    step = shlex.split(re.search(r"STEP=\((.*)\)", script).group(1))
    assert step[:4] == ["setsid", "-w", "srun", "--kill-on-bad-exit=1"]
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in step
    mounts = next(a for a in step if a.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    assert f"{tmp_path / 'run'}:{tmp_path / 'run'}" in mounts and f"{REPO}:{REPO}" in mounts
    assert "PY=python" in script  # the image's interpreter, not this machine's venv
    # the embedded config is the resolved one, in cluster mode (engines register), absolute run_dir
    cfg_text = script.split("<<'OAPL_CONFIG_EOF'\n", 1)[1].split("\nOAPL_CONFIG_EOF", 1)[0]
    cfg = RunConfig.model_validate(yaml.safe_load(cfg_text))
    assert cfg.rollout.mode == "cluster" and cfg.rollout.addresses == [] and cfg.rollout.engines == 4
    assert cfg.run_dir == tmp_path / "run" and cfg.launch.gpus_per_node == 8
    assert "--het-group=0,1 --ntasks-per-node=1" in script and "launch.preflight" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_dry_run_apptainer_and_no_requeue(tmp_path):
    script = _render(tmp_path, "--container-image", "/images/oapl.sif", "launch.container.runtime=apptainer",
                     "launch.slurm.requeue=false", "launch.preflight=false")
    comp0, _ = (_opts(c) for c in _sbatch(script))
    assert comp0["--no-requeue"] is True and "--requeue" not in comp0
    assert "RUNPY=(apptainer exec --nv --bind" in script and "/images/oapl.sif" in script
    assert "--container-image" not in re.search(r"STEP=\((.*)\)", script).group(1)
    assert "if false; then" in script


def test_bad_layouts_fail_before_rendering(tmp_path):
    out = subprocess.run([sys.executable, "-m", "oapl_megatron.entrypoints.launch", "slurm",
                          str(REPO / "configs" / "qwen3_8b_math_multinode.yaml"), "--engine-nodes", "3", "--dry-run"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 2 and "rollout.engines=16 but launch.engine_nodes=3" in out.stderr
    assert "#SBATCH" not in out.stdout


def test_every_template_placeholder_is_filled():
    from oapl_megatron.launch.slurm import fill

    with pytest.raises(ValueError, match=r"without values \['b'\]"):
        fill("{{a}} {{b}}", {"a": "1"})
    with pytest.raises(ValueError, match=r"without placeholders \['c'\]"):
        fill("{{a}}", {"a": "1", "c": "2"})


# ---- pre-flight

def _node(host, rates, ok=True, error=None):
    return {"host": host, "gemm": [{"device": f"cuda:{i}", "tflops": r, "ok": True, "error": None}
                                   for i, r in enumerate(rates)], "ok": ok, "error": error, "allreduce_s": 0.01}


def test_preflight_verdict_names_slow_failing_and_missing_nodes():
    from oapl_megatron.launch.preflight import classify

    nodes = {0: _node("a", [700, 710]), 1: _node("b", [705, 300]), 2: _node("c", [700], ok=False,
                                                                            error="collective: timeout")}
    v = classify(nodes, world=4, slow_ratio=0.5)
    assert v["missing_ranks"] == [3] and v["failing"] == {"c": ["collective: timeout"]}
    assert v["slow"] == {"b/cuda:1": 300} and not v["ok"]
    assert classify({0: _node("a", [1.0]), 1: _node("b", [0.9])}, 2, 0.5)["ok"]


def test_preflight_reports_a_node_that_never_shows_up(tmp_path):
    from dist_util import free_port

    out = subprocess.run([sys.executable, "-m", "oapl_megatron.launch.preflight", "--master",
                          f"127.0.0.1:{free_port()}", "--rank", "0", "--world", "2", "--out", str(tmp_path),
                          "--timeout-s", "2"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert out.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert "1/2 nodes reported" in summary and "MISSING ranks [1]" in summary


# ---- cleanup of earlier attempts

def test_node_cleanup_stops_only_earlier_attempts_of_this_run(tmp_path):
    from oapl_megatron.launch.node_cleanup import leftovers, stop

    def start(run, attempt):
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                env=dict(os.environ, OAPL_RUN_TAG=run, OAPL_ATTEMPT_TAG=attempt))

    old = start(str(tmp_path / "run"), "7.0")
    current = start(str(tmp_path / "run"), "7.1")
    other_run = start(str(tmp_path / "other"), "3.0")
    try:
        time.sleep(0.5)
        found = leftovers(str(tmp_path / "run"), "7.1")
        assert found == [old.pid]
        stop(found, grace_s=5)
        assert old.wait(10) == -signal.SIGTERM
        assert current.poll() is None and other_run.poll() is None
    finally:
        for p in (old, current, other_run):
            p.kill()
            p.wait()


def test_local_launcher_leaves_the_engines_their_gpus():
    from oapl_megatron.entrypoints.launch import _default_ranks

    def cfg(*o):
        return load_config(RunConfig, REPO / "configs" / "demo.yaml", list(o))

    assert _default_ranks(cfg(), 0) == 2                                   # CPU: tp × pp
    assert _default_ranks(cfg("rollout.engines=2", "rollout.engine_tp=2"), 8) == 4
    assert _default_ranks(cfg("rollout.engines=2", "rollout.devices=[6,7]"), 8) == 6


# ---- engine registration (what the Slurm job's engine step does, without Slurm)

def _cluster_cfg(tmp_path, engines=1, timeout=300):
    return load_config(RunConfig, None, [
        f"run_dir={tmp_path / 'run'}", f"model.hf_path={tmp_path / 'model'}", "rollout.mode=cluster",
        f"rollout.engines={engines}", "rollout.dtype=float32", "rollout.enforce_eager=true",
        "rollout.max_model_len=128", f"rollout.kv_cache_bytes={32 * 2**20}", f"rollout.start_timeout_s={timeout}"])


def test_trainer_names_the_engines_that_never_register(tmp_path, monkeypatch):
    from oapl_megatron.rollout.engine_client import EngineError
    from oapl_megatron.rollout.engine_group import EngineGroup
    from oapl_megatron.rollout.engine_server import AUTHKEY_ENV

    monkeypatch.setenv(AUTHKEY_ENV, "ab" * 16)
    cfg = _cluster_cfg(tmp_path, engines=2, timeout=1)
    with pytest.raises(EngineError, match=r"engines \[0, 1\] did not register in .*registry within 1s"):
        EngineGroup(str(tmp_path / "model"), cfg.rollout, log_dir=tmp_path / "run" / "engines").start()


@pytest.mark.slow
def test_engine_server_registers_and_the_trainer_attaches_without_addresses(tmp_path, monkeypatch):
    """``engine_server --config --register-dir`` as a Slurm task (SLURM_* set by hand): it registers host:port in the
    run directory; an EngineGroup in cluster mode without addresses finds it, generates, and its shutdown ends it."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from oapl_megatron.config.loader import write_resolved
    from oapl_megatron.rollout.engine_group import EngineGroup
    from oapl_megatron.rollout.engine_server import AUTHKEY_ENV
    from oapl_megatron.rollout.types import GenerationRequest, SamplingSpec

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=256)).save_pretrained(tmp_path / "model")
    cfg = _cluster_cfg(tmp_path)
    write_resolved(cfg, tmp_path / "config.yaml")
    key = os.urandom(16).hex()
    monkeypatch.setenv(AUTHKEY_ENV, key)
    env = dict(os.environ, PYTHONPATH=str(REPO), SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
               OAPL_ENGINE_HOST="127.0.0.1", OMP_NUM_THREADS="1")
    with open(tmp_path / "engine.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "oapl_megatron.entrypoints.engine_server", "--config",
                                   str(tmp_path / "config.yaml"), "--register-dir",
                                   str(tmp_path / "run" / "engines" / "registry")],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        group = EngineGroup(str(tmp_path / "model"), cfg.rollout, log_dir=tmp_path / "run" / "engines").start()
        try:
            samples = group.generate([GenerationRequest("p0", (5, 6, 7)), GenerationRequest("p1", (8, 9))],
                                     SamplingSpec(n=1, temperature=0.0, max_tokens=4))
            assert [s.engine_id for s in samples] == [0, 0] and all(len(s.token_ids) == 4 for s in samples)
            reg = json.loads((tmp_path / "run" / "engines" / "registry" / "engine0.json").read_text())
            assert reg["host"] == "127.0.0.1" and reg["pid"] == server.pid
        finally:
            group.shutdown()
        assert server.wait(timeout=60) == 0  # the trainer finishing stops the engine
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert "CPU node, no GPU assignment" in (tmp_path / "engine.log").read_text()
