"""The code_dataset task: LiveCodeBench / DeepCoder / TACO-style rows from jsonl and parquet, load-time errors
naming file/line(row)/field (or skipped and counted), the prompt with starter code, code extraction cases and their
counts, and rewards computed by really running the tests in the sandbox.

Run: ``python -m pytest tests/test_code_dataset.py -q`` (a few seconds; the reward cases start ~10 sandboxes).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oapl_megatron.config.code import CodeDatasetTaskConfig
from oapl_megatron.config.loader import load_config
from oapl_megatron.config.schema import RunConfig
from oapl_megatron.tasks.code_dataset import CodeDatasetTask, extract_code, load_code_rows
from oapl_megatron.tasks.datasets import DataError
from oapl_megatron.tasks.tokenizer import build_char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-*=.,?!:;()[]{}\\_^#\n\"'`"

LCB_FUNCTIONAL = {
    "question_id": "lcb-1", "question_content": "Return the sum of a and b.",
    "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
    "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"},
                                     {"input": "5\n-5", "output": "0", "testtype": "functional"}]),
    "metadata": json.dumps({"func_name": "add"}),
}
LCB_STDIN = {
    "question_id": "lcb-2", "question_content": "Read n and print n squared.", "starter_code": "",
    "public_test_cases": json.dumps([{"input": "3\n", "output": "9\n", "testtype": "stdin"},
                                     {"input": "12\n", "output": "144\n", "testtype": "stdin"}]),
    "metadata": "{}",
}
LCB_FIELDS = {"prompt": "question_content", "tests": "public_test_cases", "id": "question_id", "answer": None}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"), alphabet=ALPHABET)


def write_jsonl(path, rows):
    with open(path, "wb") as fh:
        for r in rows:
            fh.write(r if isinstance(r, bytes) else json.dumps(r).encode())
            fh.write(b"\n")
    return str(path)


def task_cfg(*paths, on_bad_row="error", **kw):
    data = {"source": list(paths), "fields": LCB_FIELDS, "on_bad_row": on_bad_row, "shuffle": False,
            "instruction": "Write Python 3 code in a ```python block."}
    return CodeDatasetTaskConfig(data=data, fields={"starter_code": "starter_code", "metadata": "metadata"},
                                 reward={"num_workers": 2, "sandbox": {"wall_timeout_s": 5, "cpu_time_s": 3}}, **kw)


# -- loading ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, field, problem", [
    (b"{not json", "<json>", "not valid JSON"),
    ({**LCB_STDIN, "question_id": "x", "public_test_cases": "[{\"input\": \"1\"}]"}, "public_test_cases",
     "output: missing"),
    ({**LCB_STDIN, "question_id": "x", "public_test_cases": "{\"inputs\": [\"1\"], \"outputs\": []}"},
     "public_test_cases", "has 0 entries"),
    ({**LCB_STDIN, "question_id": "x", "public_test_cases": "[]"}, "public_test_cases", "no test cases"),
    ({**LCB_STDIN, "question_id": "x", "metadata": "{broken"}, "metadata", "not JSON"),
    ({**LCB_STDIN, "question_id": "x", "metadata": "{\"func_name\": \"not an id\"}"}, "metadata", "identifier"),
    ({k: v for k, v in LCB_STDIN.items() if k != "starter_code"} | {"question_id": "x"}, "starter_code", "missing"),
    ({**LCB_STDIN, "question_id": "x", "starter_code": 7}, "starter_code", "must be a string"),
    ({**LCB_STDIN, "question_id": "x", "question_content": ""}, "question_content", "is empty"),
    ({**LCB_FUNCTIONAL, "question_id": "x", "metadata": "{}"}, "public_test_cases", "needs a function name"),
    ({**LCB_STDIN}, "question_id", "duplicate id 'lcb-2'"),
])
def test_bad_row_names_file_line_and_field(tmp_path, bad, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [LCB_FUNCTIONAL, LCB_STDIN, bad])
    cfg = task_cfg(path)
    with pytest.raises(DataError) as e:
        load_code_rows(cfg.data, cfg.fields)
    assert (e.value.file, e.value.where, e.value.field) == (path, "line 3", field)
    assert problem in str(e.value)
    # with on_bad_row=skip the same row is counted and the good ones are kept
    cfg = task_cfg(path, on_bad_row="skip")
    rows, stats = load_code_rows(cfg.data, cfg.fields)
    assert [r["id"] for r in rows] == ["lcb-1", "lcb-2"]
    assert (stats.rows_read, stats.rows_kept, stats.bad_rows, dict(stats.bad_reasons)) == (3, 2, 1, {field: 1})
    assert path in stats.bad_examples[0] and "line 3" in stats.bad_examples[0]


def test_parquet_rows_and_row_numbers(tmp_path):
    rows = [LCB_FUNCTIONAL, LCB_STDIN, {**LCB_STDIN, "question_id": "lcb-3", "public_test_cases": "[1]"}]
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = task_cfg(path)
    with pytest.raises(DataError) as e:
        load_code_rows(cfg.data, cfg.fields)
    assert (e.value.where, e.value.field) == ("row 2", "public_test_cases")
    ok, stats = load_code_rows(task_cfg(path, on_bad_row="skip").data, cfg.fields)
    assert [(r["id"], r["fn_name"], r["num_tests"]) for r in ok] == [("lcb-1", "add", 2), ("lcb-2", None, 2)]


def test_taco_style_fn_name_field_and_columns(tmp_path):
    row = {"question": "Double x.", "input_output": json.dumps({"fn_name": "double", "inputs": [[2], [5]],
                                                                 "outputs": [[4], [10]]}), "starter_code": None}
    path = write_jsonl(tmp_path / "taco.jsonl", [row])
    cfg = CodeDatasetTaskConfig(data={"source": path, "fields": {"prompt": "question", "tests": "input_output",
                                                                 "answer": None}},
                                fields={"starter_code": "starter_code"})
    rows, _ = load_code_rows(cfg.data, cfg.fields)
    assert rows[0]["id"] == "taco:1" and rows[0]["starter_code"] is None and rows[0]["num_tests"] == 2


def test_config_requires_tests_and_no_answer_field():
    with pytest.raises(ValueError, match=r"task.data.fields.answer='answer'.*set task.data.fields.answer: null"):
        CodeDatasetTaskConfig(data={"source": "x.jsonl", "fields": {"prompt": "p", "tests": "t"}})
    with pytest.raises(ValueError, match="task.data.fields.tests is null"):
        CodeDatasetTaskConfig(data={"source": "x.jsonl", "fields": {"prompt": "p", "answer": None}})


def test_run_config_accepts_the_code_task(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task:\n  type: code_dataset\n  data:\n    source: [t.jsonl]\n    fields: {prompt: q, tests: t, "
                 "answer: null}\n  reward_pool: {workers: 3}\n")
    cfg = load_config(RunConfig, f)
    assert isinstance(cfg.task, CodeDatasetTaskConfig) and cfg.task.reward_pool.resolved_workers() == 3


# -- prompts ---------------------------------------------------------------------------------------------------------

def test_prompt_has_problem_starter_code_and_instruction(tmp_path, tok):
    task = CodeDatasetTask(task_cfg(write_jsonl(tmp_path / "d.jsonl", [LCB_FUNCTIONAL, LCB_STDIN])), tok)
    func, stdin = task.train
    assert func.text.startswith("Return the sum of a and b.\n\nYou will use the following starter code")
    assert "```python\nclass Solution:\n    def add(self, a: int, b: int) -> int:\n```" in func.text
    assert func.text.endswith("Write Python 3 code in a ```python block.")
    assert "starter code" not in stdin.text  # empty starter code: no block
    assert func.meta["prompt_token_ids"] == tok.encode(func.text, add_special_tokens=True)


# -- extraction ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, code, kind", [
    ("text\n```python\nprint(1)\n```\nmore\n```python\nprint(2)\n```\n", "print(2)\n", "python"),
    ("```Python3\nprint(1)\n```", "print(1)\n", "python"),
    ("```py title=sol.py\nprint(1)\n```", "print(1)\n", "python"),
    ("```python\nprint(1)\n```\n```\nplain\n```", "print(1)\n", "python"),  # a tagged block beats a later plain one
    ("```\nprint(3)\n```", "print(3)\n", "untagged"),
    ("```cpp\nint main(){}\n```", None, "other_language"),
    ("```python\nprint(1)\n```\n```cpp\nint main(){}\n```", "print(1)\n", "python"),
    ("just prose, no code", None, "no_fence"),
    ("```python\nprint(1)\nprint(2", "print(1)\nprint(2", "unterminated"),
    ("```python\n   \n```", None, "empty"),
    ("<think>```python\nprint(0)\n```</think>no code after thinking", None, "no_fence"),
    ("<think>```python\nprint(0)\n```</think>```python\nprint(9)\n```", "print(9)\n", "python"),
])
def test_extract_code(response, code, kind):
    ex = extract_code(response)
    assert (ex.code, ex.kind) == (code, kind)


def test_extract_code_without_required_fence():
    assert extract_code("print(5)", require_fence=False).kind == "raw"
    assert extract_code("print(5)", require_fence=False).code == "print(5)"


# -- rewards (real sandbox) ------------------------------------------------------------------------------------------

def test_rewards_run_the_tests_and_count_extractions(tmp_path, tok):
    task = CodeDatasetTask(task_cfg(write_jsonl(tmp_path / "d.jsonl", [LCB_FUNCTIONAL, LCB_STDIN])), tok)
    func, stdin = task.train
    good_fn = "```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```"
    wrong_fn = "```python\nclass Solution:\n    def add(self, a, b):\n        return a - b\n```"
    r = task.reward(func, good_fn)
    assert (r.reward, r.info["reason"], r.info["passed"], r.info["extraction"]) == (1.0, "passed", 2, "python")
    r = task.reward(func, wrong_fn)
    assert r.reward == 0.0 and r.info["reason"] == "wrong_answer"
    r = task.reward(stdin, "<think>try</think>```\nn = int(input())\nprint(n * n)\n```")
    assert (r.reward, r.info["extraction"], r.info["sandbox_runs"]) == (1.0, "untagged", 2)
    r = task.reward(stdin, "I would square it.")
    assert (r.reward, r.info["reason"], r.info["sandbox_runs"]) == (0.0, "no_code", 0)
    assert dict(task.extraction_counts) == {"python": 2, "untagged": 1, "no_fence": 1}


def test_program_timeout_and_early_exit(tmp_path, tok):
    rows = [{**LCB_STDIN, "public_test_cases": json.dumps(
        [{"input": f"{i}\n", "output": f"{i * i}\n", "testtype": "stdin"} for i in range(6)])}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    slow = "```python\nimport time\nn = int(input())\ntime.sleep(0.6)\nprint(n * n)\n```"
    # a per-response budget of 1 s with 2 tests at a time: later tests never start
    cfg = task_cfg(path)
    cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"program_timeout_s": 1.0})})
    r = CodeDatasetTask(cfg, tok).reward(CodeDatasetTask(cfg, tok).train[0], slow)
    assert r.reward == 0.0 and r.info["reason"] in ("program_timeout", "timeout") and r.info["sandbox_runs"] < 6
    # early exit: the first wave fails, the rest is skipped
    wrong = "```python\nprint(-1)\n```"
    r = CodeDatasetTask(task_cfg(path), tok).reward(CodeDatasetTask(task_cfg(path), tok).train[0], wrong)
    assert r.info["sandbox_runs"] == 2 and r.info["failed"] == 6
