"""Programming problems from a dataset (LiveCodeBench / DeepCoder / TACO style), scored by running the response's
program against the row's tests in the sandbox: the ``code_dataset`` task.

    task = CodeDatasetTask.from_config(CodeDatasetTaskConfig(data=DatasetConfig(source=["train.jsonl"], ...)), tok)
    r = task.reward(prompt, response_text)      # RewardResult(reward, {"reason", "extraction", "sandbox_runs", ...})
    task.extraction_counts                      # Counter: python / untagged / other_language / no_fence / ...

Rows (one JSON object per line of a ``.jsonl``, one array in a ``.json``, or rows of a ``.parquet``/``.arrow``):
``data.fields.prompt`` (the problem text), ``data.fields.tests`` (any format of
:func:`oapl_megatron.tasks.code_reward.parse_tests`, as an object or its JSON text), optionally ``data.fields.id``
and the task's ``fields.starter_code`` / ``fields.fn_name`` / ``fields.metadata`` (a JSON object or its text with
``func_name``). Field mapping for common sources:

    LiveCodeBench:  prompt=question_content, tests=public_test_cases, id=question_id, starter_code, metadata
    DeepCoder:      prompt=problem, tests=tests, metadata (functional rows carry func_name there)
    TACO / APPS:    prompt=question, tests=input_output (fn_name inside), starter_code

Every row is validated at load time, tests included (parsed exactly as the reward will parse them), so a broken
row is reported as ``file: line N: field 'tests': ...`` (JSON lines, 1-based) or ``row N`` (tables, 0-based) or,
with ``data.on_bad_row: skip``, skipped and counted, never discovered mid-run.

Prompt: the problem, then (when the row has starter code) ``starter_code_template`` with the code filled in, then
``data.instruction``; rendered with the tokenizer's chat template like the math task
(:func:`oapl_megatron.tasks.datasets.render_prompt`).

Code extraction (:func:`extract_code`): only the text after the last ``answer_after`` marker (``</think>``) is
searched; the last fenced block tagged python/py/python3 (any case) wins, else the last untagged block; a response
whose blocks are all tagged with another language, or that has no fence, has no code (``require_fence``) and
scores 0 with reason ``no_code``, without starting a sandbox.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from oapl_megatron.config.code import CodeDatasetTaskConfig, CodeFields, CodeScoringConfig
from oapl_megatron.config.data import DatasetConfig
from oapl_megatron.tasks.base import Prompt, RewardResult, Task
from oapl_megatron.tasks.datasets import DataError, DatasetStats, PromptStream, load_rows, render_prompt

_PYTHON_TAGS = {"python", "python3", "py", "py3"}


# ---------------------------------------------------------------------------------------------------------------
# Code extraction
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Extraction:
    """The program found in a response (None = no code) and how: ``python`` (a python-tagged block), ``untagged``,
    ``unterminated`` (the last block was never closed: the response was cut), ``other_language`` (only blocks in
    another language), ``no_fence`` (no fenced block at all), ``empty`` (the chosen block is blank), ``raw`` (no
    fence, whole text used because ``require_fence=False``)."""

    code: str | None
    kind: str


def extract_code(response: str, require_fence: bool = True, answer_after: str | None = "</think>") -> Extraction:
    """The program in ``response`` (rules in the module docstring)."""
    from oapl_megatron.tasks.code_reward import FENCE

    if answer_after and answer_after in response:
        response = response.rsplit(answer_after, 1)[1]
    blocks = []
    for m in FENCE.finditer(response):
        closed = response.startswith("```", m.end() - 3) and m.end() - 3 >= m.start(2)
        blocks.append((m.group(1).lower(), m.group(2), closed))
    chosen = next(((b, c) for lang, b, c in reversed(blocks) if lang in _PYTHON_TAGS), None)
    kind = "python"
    if chosen is None:
        chosen = next(((b, c) for lang, b, c in reversed(blocks) if lang == ""), None)
        kind = "untagged"
    if chosen is None:
        if blocks:
            return Extraction(None, "other_language")
        if require_fence:
            return Extraction(None, "no_fence")
        return Extraction(response, "raw") if response.strip() else Extraction(None, "empty")
    body, closed = chosen
    if not body.strip():
        return Extraction(None, "empty")
    return Extraction(body, kind if closed else "unterminated")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def _optional_text(rec: dict, name: str | None, file: str, where: str) -> str | None:
    if name is None:
        return None
    if name not in rec:
        raise DataError(file, where, name, f"is missing (row has {sorted(rec)[:8]})")
    value = rec[name]
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(file, where, name, f"must be a string, got {type(value).__name__}")
    return value


def _fn_name(rec: dict, fields: CodeFields, file: str, where: str) -> str | None:
    name = _optional_text(rec, fields.fn_name, file, where)
    if name is None and fields.metadata is not None:
        if fields.metadata not in rec:
            raise DataError(file, where, fields.metadata, f"is missing (row has {sorted(rec)[:8]})")
        meta = rec[fields.metadata]
        if isinstance(meta, str):
            try:
                meta = json.loads(meta) if meta.strip() else {}
            except json.JSONDecodeError as e:
                raise DataError(file, where, fields.metadata, f"is a string but not JSON ({e.msg})") from None
        if meta is not None and not isinstance(meta, dict):
            raise DataError(file, where, fields.metadata, f"must be a JSON object, got {type(meta).__name__}")
        name = (meta or {}).get("func_name") or None
    if name is not None and not (isinstance(name, str) and name.isidentifier()):
        raise DataError(file, where, fields.fn_name or fields.metadata or "fn_name",
                        f"function name {name!r} is not a Python identifier")
    return name


def load_code_rows(cfg: DatasetConfig, fields: CodeFields) -> tuple[list[dict[str, Any]], DatasetStats]:
    """Read and validate every row: ``{prompt, tests (parsed cases' source object), id, starter_code, fn_name,
    num_tests, source, where}``. Malformed rows raise :class:`DataError` (file, line/row, field) or, with
    ``cfg.on_bad_row == "skip"``, are counted in the returned stats (the math loader's loop, with the code fields
    added by :func:`_code_fields`)."""
    columns = [c for c in (fields.starter_code, fields.fn_name, fields.metadata) if c]
    return load_rows(cfg, extra_columns=columns,
                     extend=lambda rec, row, file, where: _code_fields(rec, row, cfg, fields, file, where))


def _code_fields(rec: dict, row: dict[str, Any], cfg: DatasetConfig, fields: CodeFields, file: str,
                 where: str) -> None:
    from oapl_megatron.tasks.code_reward import parse_tests

    row["starter_code"] = _optional_text(rec, fields.starter_code, file, where)
    row["fn_name"] = _fn_name(rec, fields, file, where)
    try:
        row["num_tests"] = len(parse_tests(row["tests"], row["fn_name"]))
    except ValueError as e:
        raise DataError(file, where, cfg.fields.tests, str(e)) from None


def problem_text(row: dict[str, Any], template: str) -> str:
    """The problem as the model sees it before the instruction: the statement, then the starter-code block."""
    if not row.get("starter_code"):
        return row["prompt"]
    return row["prompt"].rstrip() + "\n\n" + template.format(starter_code=row["starter_code"].rstrip())


def build_code_prompts(rows: list[dict[str, Any]], tokenizer: Any, cfg: DatasetConfig, template: str,
                       stats: DatasetStats) -> list[Prompt]:
    """Render every row (dropping and counting prompts over ``cfg.max_prompt_tokens``)."""
    out = []
    for r in rows:
        text, ids = render_prompt(problem_text(r, template), tokenizer, cfg)
        if cfg.max_prompt_tokens is not None and len(ids) > cfg.max_prompt_tokens:
            stats.too_long += 1
            stats.longest_dropped_tokens = max(stats.longest_dropped_tokens, len(ids))
            continue
        meta = {"problem": r["prompt"], "prompt_token_ids": ids, "tests": r["tests"], "fn_name": r["fn_name"],
                "starter_code": r["starter_code"], "num_tests": r["num_tests"], "source": r["source"],
                "where": r["where"]}
        out.append(Prompt(id=r["id"], text=text, answer="", meta=meta))
    stats.prompts_kept = len(out)
    if not out:
        raise ValueError(f"data.source={cfg.source}: no prompts left (rows read {stats.rows_read}, malformed "
                         f"{stats.bad_rows}, too long {stats.too_long}); check fields.* and max_prompt_tokens")
    return out


def score_code_response(prompt: Prompt, response_text: str, cfg: CodeScoringConfig) -> RewardResult:
    """Extract the program (:func:`extract_code`) and run the prompt's tests: ``info`` has ``reason`` (passed,
    no_code, or the first failing test's verdict), ``extraction`` (the :class:`Extraction` kind), ``passed``/
    ``failed`` test counts and ``sandbox_runs`` (programs started). The one scoring of code rows: the training
    task's reward and ``oapl-eval --task code`` both call it."""
    from oapl_megatron.tasks.code_reward import code_reward

    ex = extract_code(response_text, cfg.require_fence, cfg.reward.answer_after)
    if ex.code is None:
        return RewardResult(0.0, {"reason": "no_code", "extraction": ex.kind, "passed": 0,
                                  "failed": prompt.meta["num_tests"], "sandbox_runs": 0})
    # The extracted program goes in fenced, so code_reward's own extraction returns it unchanged.
    out = code_reward(f"```python\n{ex.code}\n```", prompt.meta["tests"], cfg.reward, fn_name=prompt.meta["fn_name"])
    reason = "passed" if out["error"] is None else out["error"].split(": ", 1)[-1]
    runs = sum(1 for d in out["details"] if d.get("reason") != "skipped")
    return RewardResult(float(out["reward"]), {"reason": reason, "extraction": ex.kind, "passed": out["passed"],
                                               "failed": out["failed"], "sandbox_runs": runs})


# ---------------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------------
class CodeDatasetTask(Task):
    """Code problems from a dataset, each scored by running its tests (see the module docstring)."""

    def __init__(self, cfg: CodeDatasetTaskConfig, tokenizer: Any) -> None:
        self.cfg = cfg
        rows, self.train_stats = load_code_rows(cfg.data, cfg.fields)
        self.train = build_code_prompts(rows, tokenizer, cfg.data, cfg.starter_code_template, self.train_stats)
        self.eval: list[Prompt] = []
        self.eval_stats: DatasetStats | None = None
        if cfg.eval_data is not None:
            rows, self.eval_stats = load_code_rows(cfg.eval_data, cfg.fields)
            self.eval = build_code_prompts(rows, tokenizer, cfg.eval_data, cfg.starter_code_template, self.eval_stats)
            overlap = {p.id for p in self.eval} & {p.id for p in self.train}
            if overlap:
                raise ValueError(f"task.eval_data and task.data share {len(overlap)} ids, e.g. {sorted(overlap)[:3]}")
        self._lock = threading.Lock()  # reward() runs on the reward pool's threads
        self.extraction_counts: collections.Counter = collections.Counter()

    @classmethod
    def from_config(cls, cfg: CodeDatasetTaskConfig, tokenizer: Any) -> "CodeDatasetTask":
        return cls(cfg, tokenizer)

    @property
    def reward_workers(self) -> int:
        """Scoring threads of the reward pool (``task.reward_pool.workers``, default the cores)."""
        return self.cfg.reward_pool.resolved_workers()

    def prompt_stream(self, seed: int | None = None) -> PromptStream:
        seed = self.cfg.data.seed if seed is None else seed
        return PromptStream(self.train, seed=seed, shuffle=self.cfg.data.shuffle)

    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        return iter(self.prompt_stream(seed))

    def eval_prompts(self) -> list[Prompt]:
        return list(self.eval)

    def reward(self, prompt: Prompt, response_text: str) -> RewardResult:
        """:func:`score_code_response` with the task's settings; counts the extraction kinds."""
        r = score_code_response(prompt, response_text, self.cfg)
        with self._lock:
            self.extraction_counts[r.info["extraction"]] += 1
        return r
