"""Configs: every file in configs/ loads; bad values and unknown keys fail naming the field path and the value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oapl_megatron.config.loader import ConfigError, load_config, parse_override, write_resolved
from oapl_megatron.config.schema import GRPOObjective, RunConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(RunConfig, path)
    assert cfg.train.steps >= 1


def test_layering_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1.0e-4\nloop:\n  lag: 8\n")
    cfg = load_config(RunConfig, f, ["optim.lr=3e-6", "objective.type=grpo", "objective.ratio=sequence"])
    assert cfg.optim.lr == 3e-6  # override beats file
    assert cfg.loop.lag == 8  # file beats default
    assert cfg.optim.adam_beta1 == 0.9  # default
    assert isinstance(cfg.objective, GRPOObjective) and cfg.objective.ratio == "sequence"


@pytest.mark.parametrize("override, must_name", [
    (["optim.lr=-1"], ["optim.lr", "-1", "greater than 0"]),
    (["optim.lrr=1"], ["optim.lrr", "unknown key"]),
    (["parallel.tp=0"], ["parallel.tp", "0"]),
    (["loop.buffer=sometimes"], ["loop.buffer", "'clear' or 'keep'", "sometimes"]),
    (["objective.type=grpo", "objective.ratio=bogus"], ["objective.grpo.ratio", "bogus"]),
    (["objective.type=ppo"], ["objective", "ppo"]),
    (["model.fp8.enabled=true", "model.transformer_impl=local"], ["model.fp8.enabled", "transformer_engine"]),
    (["model.fp8.first_last_layers_bf16=true"], ["model.fp8.first_last_layers_bf16", "delayed"]),
    (["parallel.vpp=2"], ["parallel.vpp", "parallel.pp"]),
    (["loop.max_staleness=2"], ["loop.max_staleness", "loop.buffer"]),
    (["train.prompts_per_step=128", "loop.buffer_groups=16"], ["loop.buffer_groups", "train.prompts_per_step"]),
    (["rollout.mode=cluster", "rollout.engines=2", "rollout.addresses=[a:1]"], ["rollout.addresses"]),
])
def test_bad_values_name_the_field(override, must_name):
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, None, override)
    for text in must_name:
        assert text in str(err.value), (text, str(err.value))


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(RunConfig, bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim:\n  scheduler:\n    warmup_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"optim\.scheduler\.warmup_stepz: unknown key") as err:
        load_config(RunConfig, nested)
    assert "nested.yaml" in str(err.value)


def test_override_syntax():
    assert parse_override("optim.lr=1e-6") == (["optim", "lr"], 1e-6)
    assert parse_override("loop.lag=50") == (["loop", "lag"], 50)
    assert parse_override("rollout.addresses=[a:1, b:2]") == (["rollout", "addresses"], ["a:1", "b:2"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(RunConfig, None, ["optim.lr=1e-6", "optim.lr.x=2"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RunConfig, REPO / "configs" / "demo.yaml", ["optim.lr=2e-5"])
    path = write_resolved(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(RunConfig, path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 2e-5


def test_cli_help_does_not_import_heavy_modules():
    code = ("import sys; from oapl_megatron.entrypoints import train; "
            "rc = None\ntry:\n    train.main(['--help'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "heavy = [m for m in ('torch', 'megatron', 'vllm') if m in sys.modules]\n"
            "assert rc == 0 and not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)


def test_cli_reports_config_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "oapl_megatron.entrypoints.train",
                           str(REPO / "configs" / "demo.yaml"), "optim.lr=-3"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "optim.lr" in proc.stderr and "-3" in proc.stderr
