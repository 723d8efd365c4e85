"""Prompt datasets: validated loading, prompt rendering, length filtering, a resumable shuffled stream, and the
math dataset task.

Pipeline (one :class:`~oapl_megatron.config.data.DatasetConfig` drives all of it)::

    rows, stats = load_rows(cfg)                       # validated dicts: prompt, answer, tests, id, source, line
    prompts, stats = build_prompts(rows, tokenizer, cfg, stats)   # rendered text + token ids; long ones dropped
    stream = PromptStream(prompts, seed=cfg.seed)      # deterministic epochs with a cursor
    batch = stream.next_batch(16)                       # endless, seeded epochs

or, as a :class:`~oapl_megatron.tasks.base.Task`: ``MathDatasetTask(train_cfg, tokenizer, eval_cfg=...)``.

Loading:
- ``.jsonl`` (and ``.json`` holding JSON lines): scanned line by line here, not by the ``datasets`` json builder,
  because Arrow's JSON reader rejects the whole file on one bad line (undecodable bytes, broken JSON, a column
  whose type changes, e.g. numeric and text answers) and reports no line number; skipping a bad row would be
  impossible. A ``.json`` file holding one JSON array (DeepScaleR's layout) is read whole; its rows are named by
  0-based index. :func:`rows_to_dataset` turns validated rows into a ``datasets.Dataset`` when one is wanted.
- ``.parquet`` / ``.arrow``: ``datasets.load_dataset("parquet" | "arrow", data_files=...)``; rows are validated
  from the Arrow columns one value at a time, so a bad value is reported by its 0-based row index.
- a hub dataset name: ``datasets.load_dataset(name, split=...)``; this fails offline with an error naming
  ``data.source``.

Every malformed row (missing field, wrong type, undecodable UTF-8, broken JSON, duplicate id) raises
:class:`DataError` naming the file, the line (JSON lines, 1-based) or row (tables, 0-based) and the field, or, with
``on_bad_row="skip"``, is skipped and counted in :class:`DatasetStats`. A prompt longer than
``max_prompt_tokens`` after rendering is dropped and counted (and logged).

Rendering: with ``chat_template="auto"`` the tokenizer's chat template is applied when the tokenizer has one
(messages: optional system, then user = problem + optional instruction, generation prompt added); a tokenizer
without a template falls back to raw text (system, problem and instruction joined by blank lines, BOS added by the
tokenizer). ``"required"`` makes a missing template an error; ``"none"`` always uses raw text. The token ids are
kept in ``Prompt.meta["prompt_token_ids"]`` so the engine can be given exactly what was length-checked.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oapl_megatron.config.data import LOCAL_FORMATS, DatasetConfig, MathDatasetTaskConfig, MathRewardConfig
from oapl_megatron.tasks.base import Prompt, RewardResult, Task

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A malformed row. ``where`` is ``"line N"`` (JSON lines, 1-based) or ``"row N"`` (tables, 0-based)."""

    def __init__(self, file: str, where: str, field_name: str, problem: str):
        self.file, self.where, self.field, self.problem = file, where, field_name, problem
        super().__init__(f"{file}: {where}: field {field_name!r}: {problem}")


@dataclass
class DatasetStats:
    """What loading did: rows read, kept, skipped (by reason) and prompts dropped for length."""

    rows_read: int = 0
    rows_kept: int = 0
    bad_rows: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    #: The first few skip messages (file, line/row, field), for the log.
    bad_examples: list[str] = field(default_factory=list)
    too_long: int = 0
    longest_dropped_tokens: int = 0
    prompts_kept: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["bad_reasons"] = dict(self.bad_reasons)
        return d


_MAX_EXAMPLES = 10

# ---------------------------------------------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------------------------------------------


def _check_str(value: Any, name: str, file: str, where: str, allow_numbers: bool = False) -> str:
    if isinstance(value, bytes):  # a binary column: accept it only when it is UTF-8 text
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(file, where, name, f"bytes are not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if isinstance(value, str):
        if any("\ud800" <= ch <= "\udfff" for ch in value):  # lone surrogates = undecodable bytes (see _scan_jsonl)
            raise DataError(file, where, name, "text is not valid UTF-8")
        if not value.strip():
            raise DataError(file, where, name, "is empty")
        return value
    if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        # Numeric answers (GSM8K-style "answer": 72) are common; the verifier compares text.
        return str(value)
    want = "a string or a number" if allow_numbers else "a string"
    raise DataError(file, where, name, f"must be {want}, got {type(value).__name__} {_short(value)}")


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _validate_row(row: dict[str, Any], cfg: DatasetConfig, file: str, where: str) -> dict[str, Any]:
    """One raw row → ``{"prompt", "answer", "tests", "id"}`` (absent fields are None) or :class:`DataError`."""
    f = cfg.fields
    out: dict[str, Any] = {"answer": None, "tests": None, "id": None}
    wanted = [("prompt", f.prompt), ("answer", f.answer), ("tests", f.tests), ("id", f.id)]
    for key, name in wanted:
        if name is None:
            continue
        if name not in row:
            raise DataError(file, where, name, f"is missing (fields.{key}={name!r}; row has {sorted(row)[:8]})")
        if row[name] is None:
            raise DataError(file, where, name, "is null")
        value = row[name]
        if key == "prompt":
            out[key] = _check_str(value, name, file, where)
        elif key in ("answer", "id"):
            out[key] = _check_str(value, name, file, where, allow_numbers=True)
        else:  # tests: a list/dict, or a JSON string of one
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise DataError(file, where, name, f"is a string but not JSON ({e.msg})") from None
            if not isinstance(value, (list, dict)):
                raise DataError(file, where, name, f"must be a list or dict of tests, got {type(value).__name__}")
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


def _scan_jsonl(path: str) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """Yield ``(where, record or DataError)`` per non-blank line of a JSON-lines file, with 1-based line numbers."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"line {lineno}"
            if not raw.strip():
                continue
            # surrogateescape keeps undecodable bytes as lone surrogates, so the JSON still parses and the
            # field that holds them can be named (checked in _check_str).
            text = raw.decode("utf-8", errors="surrogateescape")
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                yield where, DataError(path, where, "<json>", f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(rec, dict):
                yield where, DataError(path, where, "<json>", f"must be a JSON object, got {type(rec).__name__}")
                continue
            bad_keys = [k for k in rec if any("\ud800" <= ch <= "\udfff" for ch in k)]
            if bad_keys:
                yield where, DataError(path, where, "<key>", "a field name is not valid UTF-8")
                continue
            yield where, rec


def _scan_json(path: str) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """A ``.json`` file: one JSON array of objects (rows named by 0-based index), else JSON lines."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _scan_jsonl(path)
        return
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        # A broken array cannot be split into rows: the whole file is unusable, whatever on_bad_row says.
        raise DataError(path, f"line {e.lineno}", "<json>", f"not valid JSON ({e.msg} at column {e.colno})") from None
    for i, rec in enumerate(items):
        where = f"row {i}"
        if not isinstance(rec, dict):
            yield where, DataError(path, where, "<json>", f"must be a JSON object, got {type(rec).__name__}")
        else:
            yield where, rec


def _scan_table(path: str, builder: str, columns: list[str]) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """Yield ``(where, record or DataError)`` per row of a parquet/arrow file loaded through ``datasets``."""
    import datasets

    ds = datasets.load_dataset(builder, data_files=[path], split="train", keep_in_memory=True)
    table = ds.data.table  # pyarrow.Table; values are read one by one so a bad one is pinned to its row
    present = [c for c in columns if c in table.column_names]
    cols = {c: table.column(c) for c in present}
    for i in range(table.num_rows):
        where = f"row {i}"
        rec: dict[str, Any] = {}
        err: DataError | None = None
        for c, col in cols.items():
            try:
                rec[c] = col[i].as_py()
            except UnicodeDecodeError as e:
                err = DataError(path, where, c, f"text is not valid UTF-8 ({e.reason} at byte {e.start})")
                break
        yield where, (err if err is not None else rec)


def _scan_hub(cfg: DatasetConfig, columns: list[str]) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    import datasets

    name = cfg.source[0]
    try:
        ds = datasets.load_dataset(name, split=cfg.split)
    except Exception as e:  # offline, unknown name, no such split: all mean the same to the user
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            " HF_HUB_OFFLINE is set (no network here): download it elsewhere and point data.source at local "
            ".jsonl/.parquet/.arrow files."
            if offline
            else " Check the name and split, or point data.source at local files."
        )
        raise DataError(
            f"data.source={name!r}", f"split {cfg.split!r}", "source",
            f"could not load hub dataset ({type(e).__name__}: {str(e)[:200]}).{hint}",
        ) from e
    for i, row in enumerate(ds):
        yield f"row {i}", {c: row.get(c) for c in columns if c in row}


def _check_local_file(path: str) -> str:
    suffix = Path(path).suffix
    if suffix not in LOCAL_FORMATS:
        raise DataError(path, "file", "source", f"unknown suffix {suffix!r}; use one of {sorted(LOCAL_FORMATS)}")
    if not os.path.isfile(path):
        raise DataError(path, "file", "source", "no such file")
    return LOCAL_FORMATS[suffix]


def load_rows(cfg: DatasetConfig, extra_columns: Sequence[str] = (),
              extend: Callable[[dict[str, Any], dict[str, Any], str, str], None] | None = None,
              ) -> tuple[list[dict[str, Any]], DatasetStats]:
    """Read and validate every row of ``cfg.source``.

    ``extra_columns``/``extend``: a task with fields of its own (code: starter code, function name) names the columns
    to read and validates them in ``extend(record, row, file, where)``, which adds them to ``row`` or raises
    :class:`DataError` — such a row is then reported or skipped and counted like any other malformed row.

    Returns:
        rows: dicts with ``prompt`` (str), ``answer`` (str | None), ``tests`` (list | dict | None), ``id`` (str;
            ``<file stem>:<line|row>`` when ``fields.id`` is None), ``source`` (file) and ``where`` (line/row).
        stats: counts of rows read / kept / skipped.

    Raises:
        DataError: the first malformed row when ``cfg.on_bad_row == "error"`` (naming file, line/row and field);
            an unreadable source always.
    """
    stats = DatasetStats()
    columns = [c for c in (cfg.fields.prompt, cfg.fields.answer, cfg.fields.tests, cfg.fields.id, *extra_columns) if c]
    rows: list[dict[str, Any]] = []
    seen_ids: dict[str, str] = {}

    def sources() -> Iterator[tuple[str, Iterator[tuple[str, dict[str, Any] | DataError]]]]:
        if not cfg.is_local:
            yield f"{cfg.source[0]}[{cfg.split}]", _scan_hub(cfg, columns)
            return
        for path in cfg.source:
            builder = _check_local_file(path)
            if builder == "json":
                yield path, (_scan_json(path) if path.endswith(".json") else _scan_jsonl(path))
            else:
                yield path, _scan_table(path, builder, columns)

    for file, records in sources():
        stem = Path(file).stem
        for where, rec in records:
            stats.rows_read += 1
            try:
                if isinstance(rec, DataError):
                    raise rec
                row = _validate_row(rec, cfg, file, where)
                if extend is not None:
                    extend(rec, row, file, where)
                if row["id"] is None:
                    row["id"] = f"{stem}:{where.split()[-1]}"
                if row["id"] in seen_ids:
                    first = seen_ids[row["id"]]
                    id_field = cfg.fields.id or "id"
                    raise DataError(file, where, id_field, f"duplicate id {row['id']!r} (first at {first})")
            except DataError as e:
                if cfg.on_bad_row == "error":
                    raise
                stats.bad_rows += 1
                stats.bad_reasons[e.field] += 1
                if len(stats.bad_examples) < _MAX_EXAMPLES:
                    stats.bad_examples.append(str(e))
                continue
            seen_ids[row["id"]] = f"{file} {where}"
            row["source"], row["where"] = file, where
            rows.append(row)
            if cfg.limit is not None and len(rows) >= cfg.limit:
                break
        if cfg.limit is not None and len(rows) >= cfg.limit:
            break
    stats.rows_kept = len(rows)
    if stats.bad_rows:
        logger.warning(
            "data: skipped %d malformed rows of %d (by field: %s); first: %s",
            stats.bad_rows, stats.rows_read, dict(stats.bad_reasons), stats.bad_examples[0],
        )
    return rows, stats


def rows_to_dataset(rows: list[dict[str, Any]]):
    """The validated rows as a ``datasets.Dataset`` (tests are stored as JSON text: Arrow needs one type)."""
    import datasets

    return datasets.Dataset.from_list(
        [{**r, "tests": None if r["tests"] is None else json.dumps(r["tests"])} for r in rows]
    )


# ---------------------------------------------------------------------------------------------------------------
# Rendering and length filtering
# ---------------------------------------------------------------------------------------------------------------


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(problem: str, tokenizer: Any, cfg: DatasetConfig) -> tuple[str, list[int]]:
    """The prompt text the model sees and its token ids (what the engine should be given).

    Chat template (when used): ``[system?, user: problem + "\\n\\n" + instruction?]`` with the generation prompt;
    the text is tokenized without extra special tokens (the template has them). Raw text: system, problem and
    instruction joined by blank lines, tokenized with the tokenizer's special tokens (e.g. BOS).
    """
    user = problem if not cfg.instruction else f"{problem}\n\n{cfg.instruction}"
    use_template = cfg.chat_template != "none" and has_chat_template(tokenizer)
    if cfg.chat_template == "required" and not has_chat_template(tokenizer):
        raise ValueError(
            f"data.chat_template='required' but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no "
            "chat template; use chat_template='auto' (raw-text fallback) or a tokenizer with a template"
        )
    if use_template:
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
            {"role": "user", "content": user}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        text = "\n\n".join([p for p in (cfg.system_prompt, user) if p])
        ids = tokenizer.encode(text, add_special_tokens=True)
    return text, list(ids)


def build_prompts(
    rows: list[dict[str, Any]], tokenizer: Any, cfg: DatasetConfig, stats: DatasetStats | None = None
) -> tuple[list[Prompt], DatasetStats]:
    """Render every row, drop (and count) prompts over ``cfg.max_prompt_tokens``, and return :class:`Prompt` s.

    ``Prompt.meta`` holds ``problem`` (the raw text), ``prompt_token_ids``, ``tests`` (code), ``source``, ``where``.
    """
    stats = stats or DatasetStats(rows_read=len(rows), rows_kept=len(rows))
    prompts: list[Prompt] = []
    for r in rows:
        text, ids = render_prompt(r["prompt"], tokenizer, cfg)
        if cfg.max_prompt_tokens is not None and len(ids) > cfg.max_prompt_tokens:
            stats.too_long += 1
            stats.longest_dropped_tokens = max(stats.longest_dropped_tokens, len(ids))
            continue
        meta = {"problem": r["prompt"], "prompt_token_ids": ids, "source": r["source"], "where": r["where"]}
        if r["tests"] is not None:
            meta["tests"] = r["tests"]
        prompts.append(Prompt(id=r["id"], text=text, answer=r["answer"] or "", meta=meta))
    stats.prompts_kept = len(prompts)
    if stats.too_long:
        logger.warning(
            "data: dropped %d of %d prompts longer than max_prompt_tokens=%d (longest %d tokens)",
            stats.too_long, len(rows), cfg.max_prompt_tokens, stats.longest_dropped_tokens,
        )
    if not prompts:
        raise ValueError(
            f"data.source={cfg.source}: no prompts left (rows read {stats.rows_read}, malformed {stats.bad_rows}, "
            f"too long {stats.too_long}); check fields.* and max_prompt_tokens"
        )
    return prompts, stats


def load_prompts(cfg: DatasetConfig, tokenizer: Any) -> tuple[list[Prompt], DatasetStats]:
    """:func:`load_rows` then :func:`build_prompts`."""
    rows, stats = load_rows(cfg)
    return build_prompts(rows, tokenizer, cfg, stats)


# ---------------------------------------------------------------------------------------------------------------
# The resumable stream
# ---------------------------------------------------------------------------------------------------------------


class PromptStream:
    """Endless, deterministic epochs over a fixed prompt list.

    Epoch ``e`` visits every prompt exactly once, in the order ``permutation(N)`` of a generator seeded with
    ``(seed, e)`` (or in file order when ``shuffle=False``). The cursor is ``(epoch, position)``; a batch that
    crosses the end of an epoch takes the rest of epoch ``e`` and then the start of epoch ``e + 1``. The order is a
    pure function of ``(seed, epoch)``, so a resumed run that skips the ``k`` prompts it already consumed continues
    exactly where the interrupted one was (the loop resumes this way).
    """

    def __init__(self, prompts: Sequence[Prompt], seed: int, shuffle: bool = True):
        if not prompts:
            raise ValueError("PromptStream needs at least one prompt")
        self._prompts = list(prompts)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self._prompts)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._prompts))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._prompts))

    def next_batch(self, n: int) -> list[Prompt]:
        """The next ``n`` prompts (crossing into the next epoch when this one runs out)."""
        if n < 1:
            raise ValueError(f"next_batch(n={n}): n must be >= 1")
        out: list[Prompt] = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(out), len(self._order) - self.position)
            out.extend(self._prompts[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def __iter__(self) -> Iterator[Prompt]:
        while True:
            yield self.next_batch(1)[0]


# ---------------------------------------------------------------------------------------------------------------
# The math dataset task
# ---------------------------------------------------------------------------------------------------------------


class MathDatasetTask(Task):
    """Math problems from a dataset, scored by :func:`oapl_megatron.tasks.math_reward.math_reward`.

    ``train_prompts(seed)`` is an endless :class:`PromptStream` over the training set; use :meth:`prompt_stream` to
    get the stream object itself. ``eval_prompts()`` is the evaluation set in file order
    (empty without ``eval_cfg``). Rows need a prompt and an answer field.
    """

    def __init__(
        self,
        train_cfg: DatasetConfig,
        tokenizer: Any,
        eval_cfg: DatasetConfig | None = None,
        reward_cfg: MathRewardConfig | None = None,
    ):
        for name, c in (("data", train_cfg), ("eval_data", eval_cfg)):
            if c is not None and c.fields.answer is None:
                raise ValueError(f"{name}.fields.answer is None: the math task needs a reference answer field")
        self.train_cfg, self.reward_cfg = train_cfg, reward_cfg or MathRewardConfig()
        self.train, self.train_stats = load_prompts(train_cfg, tokenizer)
        self.eval: list[Prompt] = []
        self.eval_stats: DatasetStats | None = None
        if eval_cfg is not None:
            self.eval, self.eval_stats = load_prompts(eval_cfg, tokenizer)
            overlap = {p.id for p in self.eval} & {p.id for p in self.train}
            if overlap:
                raise ValueError(f"eval_data and data share {len(overlap)} ids, e.g. {sorted(overlap)[:3]}")

    @classmethod
    def from_config(cls, cfg: MathDatasetTaskConfig, tokenizer: Any) -> "MathDatasetTask":
        """Build from the ``task:`` section (``type: math_dataset``)."""
        return cls(cfg.data, tokenizer, eval_cfg=cfg.eval_data, reward_cfg=cfg.reward)

    def prompt_stream(self, seed: int | None = None) -> PromptStream:
        """A fresh stream over the training prompts (``seed`` defaults to ``data.seed``)."""
        seed = self.train_cfg.seed if seed is None else seed
        return PromptStream(self.train, seed=seed, shuffle=self.train_cfg.shuffle)

    def train_prompts(self, seed: int) -> Iterator[Prompt]:
        return iter(self.prompt_stream(seed))

    def eval_prompts(self) -> list[Prompt]:
        return list(self.eval)

    def reward(self, prompt: Prompt, response_text: str) -> RewardResult:
        from oapl_megatron.tasks.math_reward import math_reward

        out = math_reward(response_text, prompt.answer, self.reward_cfg)
        return RewardResult(reward=float(out["reward"]), info={k: v for k, v in out.items() if k != "reward"})
