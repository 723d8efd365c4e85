"""Prompt datasets: malformed rows are reported by file/line(row)/field or skipped and counted; rendering with and
without a chat template; over-long prompts dropped and counted; the prompt stream's cursor restores exactly."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oapl_megatron.config.data import DatasetConfig, MathDatasetTaskConfig
from oapl_megatron.tasks.base import Prompt
from oapl_megatron.tasks.datasets import (
    DataError,
    MathDatasetTask,
    PromptStream,
    build_prompts,
    load_prompts,
    load_rows,
    render_prompt,
    rows_to_dataset,
)
from oapl_megatron.tasks.tokenizer import build_char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-*=.,?!:;()[]{}\\_^#\n"
TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"), alphabet=ALPHABET)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    t = build_char_tokenizer(tmp_path_factory.mktemp("chat_tok"), alphabet=ALPHABET)
    t.chat_template = TEMPLATE
    return t


def write_jsonl(path, lines):
    """``lines``: dicts (dumped as JSON) or raw bytes (written as is), one per line."""
    with open(path, "wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            fh.write(b"\n")
    return str(path)


def good(i):
    return {"problem": f"What is {i} + {i}?", "solution": str(2 * i), "uid": f"p{i}"}


def cfg_for(*paths, **kw):
    fields = kw.pop("fields", {"prompt": "problem", "answer": "solution", "id": "uid"})
    return DatasetConfig(source=list(paths), fields=fields, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Malformed rows
# ----------------------------------------------------------------------------------------------------------------

BAD_JSONL = [
    (good(1) | {"solution": None}, "line 2", "solution", "is null"),
    ({"problem": "q", "uid": "x"}, "line 2", "solution", "is missing"),
    (good(1) | {"problem": ["a", "list"]}, "line 2", "problem", "must be a string, got list"),
    (good(1) | {"solution": True}, "line 2", "solution", "must be a string or a number, got bool"),
    (b'{"problem": "caf\xe9 bad", "solution": "1", "uid": "u"}', "line 2", "problem", "not valid UTF-8"),
    (b'{"problem": "ok", "solution": "1", "uid": "u\xff\xfe"}', "line 2", "uid", "not valid UTF-8"),
    (b'{"problem": "ok", "solution": ', "line 2", "<json>", "not valid JSON"),
    (b"[1, 2]", "line 2", "<json>", "must be a JSON object"),
    (good(1) | {"problem": "   "}, "line 2", "problem", "is empty"),
    (good(0), "line 2", "uid", "duplicate id 'p0' (first at"),
]


@pytest.mark.parametrize("bad,where,field,msg", BAD_JSONL, ids=[f"{f}:{m}" for _, _, f, m in BAD_JSONL])
def test_jsonl_bad_row_names_file_line_field(tmp_path, bad, where, field, msg):
    path = write_jsonl(tmp_path / "train.jsonl", [good(0), bad, good(2)])
    with pytest.raises(DataError) as ei:
        load_rows(cfg_for(path))
    e = ei.value
    assert (e.file, e.where, e.field) == (path, where, field)
    assert msg in str(e) and path in str(e) and where in str(e) and repr(field) in str(e)


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_bytes(b"\n" + json.dumps(good(0)).encode() + b"\n\n" + b'{"problem": 3, "solution": "1", "uid": "z"}\n')
    with pytest.raises(DataError, match=r"gaps.jsonl: line 4: field 'problem': must be a string, got int"):
        load_rows(cfg_for(str(path)))


def test_json_array_file(tmp_path):
    path = tmp_path / "deepscaler.json"
    path.write_bytes(json.dumps([good(0), good(1) | {"solution": None}, good(2)]).encode())
    with pytest.raises(DataError, match=r"deepscaler.json: row 1: field 'solution': is null"):
        load_rows(cfg_for(str(path)))
    rows, stats = load_rows(cfg_for(str(path), on_bad_row="skip"))
    assert [r["id"] for r in rows] == ["p0", "p2"] and stats.bad_rows == 1
    path.write_bytes(b'[{"problem": "a", "solution": "1", "uid": "u"},\n {"problem": ]')
    with pytest.raises(DataError, match=r"deepscaler.json: line 2: field '<json>': not valid JSON"):
        load_rows(cfg_for(str(path), on_bad_row="skip"))  # a broken array has no rows to skip to


def write_parquet(path, table):
    pq.write_table(table, path)
    return str(path)


def invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A pyarrow *string* array holding raw bytes (pyarrow validates UTF-8 only when asked; writers in the wild
    do produce such files)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))]
    )


def test_parquet_bad_rows_name_file_row_field(tmp_path):
    base = {"problem": ["a?", "b?", "c?"], "solution": ["1", "2", "3"], "uid": ["x", "y", "z"]}
    # missing value (null) in row 2
    p = write_parquet(tmp_path / "null.parquet", pa.table(base | {"solution": ["1", "2", None]}))
    with pytest.raises(DataError, match=r"null.parquet: row 2: field 'solution': is null"):
        load_rows(cfg_for(p))
    # missing column
    p = write_parquet(tmp_path / "nocol.parquet", pa.table({k: v for k, v in base.items() if k != "solution"}))
    with pytest.raises(DataError, match=r"nocol.parquet: row 0: field 'solution': is missing"):
        load_rows(cfg_for(p))
    # wrong type: an integer prompt column
    p = write_parquet(tmp_path / "int.parquet", pa.table(base | {"problem": [1, 2, 3]}))
    with pytest.raises(DataError, match=r"int.parquet: row 0: field 'problem': must be a string, got int"):
        load_rows(cfg_for(p))
    # invalid UTF-8 bytes inside a string column at row 1
    bad = invalid_utf8_strings([b"fine?", b"caf\xe9?", b"ok?"])
    p = write_parquet(tmp_path / "utf8.parquet", pa.table(base | {"problem": bad}))
    with pytest.raises(DataError, match=r"utf8.parquet: row 1: field 'problem': text is not valid UTF-8"):
        load_rows(cfg_for(p))
    # a binary column is accepted when it decodes, reported when it does not
    binary = pa.array([b"fine?", b"\xff\xfe", b"ok?"], type=pa.binary())
    p = write_parquet(tmp_path / "bin.parquet", pa.table(base | {"problem": binary}))
    with pytest.raises(DataError, match=r"bin.parquet: row 1: field 'problem': bytes are not valid UTF-8"):
        load_rows(cfg_for(p))
    rows, stats = load_rows(cfg_for(p, on_bad_row="skip"))
    assert [r["prompt"] for r in rows] == ["fine?", "ok?"] and stats.bad_rows == 1


def test_skip_mode_counts_every_bad_row(tmp_path):
    # Every BAD_JSONL entry is malformed wherever it sits (the last one repeats good(0)'s id).
    lines = [good(0)] + [b for b, *_ in BAD_JSONL] + [good(5)]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    rows, stats = load_rows(cfg_for(path, on_bad_row="skip"))
    assert [(r["id"], r["where"]) for r in rows] == [("p0", "line 1"), ("p5", f"line {len(lines)}")]
    assert (stats.rows_read, stats.bad_rows, stats.rows_kept) == (len(lines), len(BAD_JSONL), 2)
    want = {}
    for _, _, field, _ in BAD_JSONL:
        want[field] = want.get(field, 0) + 1
    assert dict(stats.bad_reasons) == want
    assert stats.bad_examples[0].startswith(f"{path}: line 2: field 'solution'")
    assert all("mixed.jsonl: line" in m for m in stats.bad_examples)


def test_numeric_answers_and_default_ids(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q1", "answer": 72}, {"question": "q2", "answer": 2.5}])
    rows, _ = load_rows(DatasetConfig(source=path, fields={"prompt": "question", "answer": "answer"}))
    assert [(r["answer"], r["id"]) for r in rows] == [("72", "gsm:1"), ("2.5", "gsm:2")]
    ds = rows_to_dataset(rows)
    assert ds.num_rows == 2 and ds[0]["prompt"] == "q1"


def test_tests_field_json_and_limit(tmp_path):
    path = write_jsonl(
        tmp_path / "code.jsonl",
        [{"q": "a", "t": json.dumps([{"input": "1", "output": "2"}])}, {"q": "b", "t": [1]}, {"q": "c", "t": "{bad"}],
    )
    cfg = DatasetConfig(source=path, fields={"prompt": "q", "answer": None, "tests": "t"})
    with pytest.raises(DataError, match=r"code.jsonl: line 3: field 't': is a string but not JSON"):
        load_rows(cfg)
    rows, _ = load_rows(cfg.model_copy(update={"limit": 2}))
    assert rows[0]["tests"] == [{"input": "1", "output": "2"}] and len(rows) == 2


def test_hub_name_offline_names_the_field(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as ei:
        load_rows(DatasetConfig(source="someorg/some-math-dataset"))
    assert "data.source='someorg/some-math-dataset'" in str(ei.value) and "HF_HUB_OFFLINE" in str(ei.value)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="mixes local files"):
        DatasetConfig(source=["a.jsonl", "org/name"])
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        DatasetConfig(source="a.jsonl", max_prompt_tokens=0)
    with pytest.raises(ValueError, match="on_bad_row"):
        DatasetConfig(source="a.jsonl", on_bad_row="ignore")
    with pytest.raises(ValueError, match="Extra inputs"):
        DatasetConfig(source="a.jsonl", prompt_field="x")
    with pytest.raises(DataError, match="no such file"):
        load_rows(DatasetConfig(source=str(tmp_path / "absent.jsonl")))


# ----------------------------------------------------------------------------------------------------------------
# Rendering and length filtering
# ----------------------------------------------------------------------------------------------------------------


def test_render_with_template_raw_fallback_and_required(tok, chat_tok):
    cfg = DatasetConfig(source="a.jsonl", system_prompt="Be brief.", instruction="Answer in \\boxed{}.")
    text, ids = render_prompt("What is 2+2?", chat_tok, cfg)
    assert text == "[system]Be brief.\n[user]What is 2+2?\n\nAnswer in \\boxed{}.\n[assistant]"
    assert ids == chat_tok.encode(text, add_special_tokens=False)
    # No template: raw text, and the tokenizer's BOS is added.
    text, ids = render_prompt("What is 2+2?", tok, cfg)
    assert text == "Be brief.\n\nWhat is 2+2?\n\nAnswer in \\boxed{}."
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == text
    # "none" ignores a template that exists; "required" refuses a tokenizer without one.
    assert render_prompt("x", chat_tok, cfg.model_copy(update={"chat_template": "none"}))[0].startswith("Be brief.")
    with pytest.raises(ValueError, match="chat_template='required'"):
        render_prompt("x", tok, cfg.model_copy(update={"chat_template": "required"}))


def test_overlong_prompts_dropped_and_counted(tmp_path, tok, caplog):
    lines = [{"problem": "a" * n, "solution": "1", "uid": f"n{n}"} for n in (5, 50, 10, 80)]
    path = write_jsonl(tmp_path / "len.jsonl", lines)
    # raw text: BOS + n characters -> n + 1 tokens
    with caplog.at_level("WARNING"):
        prompts, stats = load_prompts(cfg_for(path, max_prompt_tokens=11), tok)
    assert [p.id for p in prompts] == ["n5", "n10"]
    assert stats.too_long == 2 and stats.longest_dropped_tokens == 81 and stats.prompts_kept == 2
    assert "dropped 2 of 4 prompts longer than max_prompt_tokens=11" in caplog.text
    ids = prompts[1].meta["prompt_token_ids"]
    assert ids == tok.encode("a" * 10) and len(ids) == 11
    with pytest.raises(ValueError, match="no prompts left"):
        load_prompts(cfg_for(path, max_prompt_tokens=3), tok)


# ----------------------------------------------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------------------------------------------


def _prompts(n):
    return [Prompt(id=f"p{i}", text=f"t{i}", answer=str(i)) for i in range(n)]


def test_stream_epochs_are_permutations_and_differ():
    prompts = _prompts(10)
    s = PromptStream(prompts, seed=0)
    seq = [p.id for p in s.next_batch(3)] + [p.id for _ in range(9) for p in s.next_batch(3)]  # 30 = 3 epochs
    epochs = [seq[i * 10 : (i + 1) * 10] for i in range(3)]
    for e in epochs:
        assert sorted(e) == sorted(p.id for p in prompts)  # nothing lost or repeated within an epoch
    assert epochs[0] != epochs[1] != epochs[2]
    assert s.epoch == 2 and s.position == 10
    # same seed, same sequence; a different seed, a different one
    assert [p.id for p in PromptStream(prompts, seed=0).next_batch(30)] == seq
    assert [p.id for p in PromptStream(prompts, seed=1).next_batch(30)] != seq


def test_stream_refuses_an_empty_batch_or_list():
    s = PromptStream(_prompts(5), seed=0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        s.next_batch(0)
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptStream([], seed=0)


# ----------------------------------------------------------------------------------------------------------------
# The math task
# ----------------------------------------------------------------------------------------------------------------


def test_math_dataset_task(tmp_path, chat_tok):
    train = write_jsonl(tmp_path / "train.jsonl", [good(i) for i in range(6)])
    evalp = write_jsonl(tmp_path / "eval.jsonl", [good(i) | {"uid": f"e{i}"} for i in (7, 8)])
    task = MathDatasetTask(
        cfg_for(train, instruction="Put the answer in \\boxed{}.", seed=5),
        chat_tok,
        eval_cfg=cfg_for(evalp, shuffle=False),
    )
    assert [p.id for p in task.eval_prompts()] == ["e7", "e8"]
    it = task.train_prompts(seed=5)
    first = [next(it).id for _ in range(6)]
    assert sorted(first) == [f"p{i}" for i in range(6)]
    assert first == [p.id for p in task.prompt_stream().next_batch(6)]  # default seed = data.seed = 5
    assert "Put the answer in" in task.prompt_stream().next_batch(1)[0].text
    p = task.eval_prompts()[0]
    assert p.text == "[user]What is 7 + 7?\n[assistant]" and p.answer == "14"  # eval config: no instruction
    right = task.reward(p, "<think>7+7</think> so \\boxed{14}</s>")
    wrong = task.reward(p, "\\boxed{15}")
    assert right.reward == 1.0 and right.info["extracted"] == "14" and right.info["reason"] == "correct"
    assert wrong.reward == 0.0 and wrong.info["reason"] == "wrong"
    same = MathDatasetTask.from_config(
        MathDatasetTaskConfig(data=cfg_for(train, instruction="Put the answer in \\boxed{}.", seed=5),
                              eval_data=cfg_for(evalp, shuffle=False)),
        chat_tok,
    )
    assert [p.id for p in same.prompt_stream().next_batch(6)] == first and same.eval_prompts() == task.eval_prompts()
    with pytest.raises(ValueError, match="share 1 ids"):
        MathDatasetTask(cfg_for(train), chat_tok, eval_cfg=cfg_for(write_jsonl(tmp_path / "e2.jsonl", [good(0)])))
    with pytest.raises(ValueError, match="fields.answer is None"):
        MathDatasetTask(cfg_for(train, fields={"prompt": "problem", "answer": None}), chat_tok)


def test_build_prompts_keeps_tests_meta(tok):
    rows = [{"prompt": "a", "answer": None, "tests": [1], "id": "c0", "source": "f", "where": "line 1"}]
    prompts, stats = build_prompts(rows, tok, DatasetConfig(source="x.jsonl"))
    assert prompts[0].meta["tests"] == [1] and prompts[0].answer == "" and stats.prompts_kept == 1
