"""Reward for code answers: run the model's program against tests in the sandbox and score the verdicts.

Usage::

    from oapl_megatron.config.sandbox import CodeRewardConfig
    from oapl_megatron.tasks.code_reward import code_reward

    r = code_reward(model_response, {"inputs": ["1 2\\n"], "outputs": ["3\\n"]}, CodeRewardConfig())
    r["reward"], r["passed"], r["failed"], r["error"], r["details"]

    # command line (through the lead's entry point, or directly):
    #   oapl-reward code --program answer.md --tests tests.json [--fn-name f] [--partial-credit]
    #   python -m oapl_megatron.tasks.code_reward --program answer.md --tests tests.json

Test formats accepted (a parsed object or its JSON text):

* DeepCoder / APPS / TACO: ``{"inputs": [...], "outputs": [...]}`` (stdin/stdout; an entry may be a string or a
  list of lines) or ``{"fn_name": "f", "inputs": [[args...], ...], "outputs": [value, ...]}`` (function call;
  APPS wraps an expected value in a one-element list, which is accepted too).
* LiveCodeBench / DeepCoder-LCB: ``[{"input": "...", "output": "...", "testtype": "stdin" | "functional"}, ...]``
  (DeepCoder's ``"type": "stdin_stdout" | "function_call"`` spelling too). A functional input is one JSON value per
  line (the arguments) and the output one JSON value; the function name comes from ``fn_name=``, an entry's
  ``fn_name``, or a wrapper ``{"tests": [...], "fn_name": ...}`` / ``{"tests": [...], "metadata": {"func_name"}}``.
  The function is a method of ``class Solution`` when there is one, else a top-level function.

Judging: stdout is compared as whitespace-normalized lines (blank lines dropped, tokens split on whitespace); when
two tokens differ but both are numbers, they match within ``float_rel_tol``/``float_abs_tol`` (integers compare
exactly). Function results travel as JSON and compare structurally with the same numeric tolerance. The reward
is 1.0 when every test passes, else ``passed / total`` with ``partial_credit`` and 0.0 without.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from oapl_megatron.config.sandbox import CodeRewardConfig, SandboxConfig
from oapl_megatron.tasks.sandbox import SandboxResult, run_many

_RESULT_MARK = "__OAPL_RESULT__"
FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_INT = re.compile(r"[+-]?\d+")
_NUM = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

# Reason per sandbox limit, as reported in details[i]["reason"].
_LIMIT_REASON = {
    "wall_time": "timeout",
    "cpu_time": "cpu_limit",
    "memory": "memory_limit",
    "stdout": "output_limit",
    "stderr": "output_limit",
    "file_size": "file_size_limit",
    "processes": "process_limit",
    "open_files": "open_files_limit",
}

# Imports that LiveCodeBench-style functional solutions assume (they often use List, defaultdict, ... bare).
_CALL_PRELUDE = (
    "from typing import *\n"
    "import bisect, collections, functools, heapq, itertools, math, re, string\n"
    "from collections import Counter, OrderedDict, defaultdict, deque\n"
    "from functools import cache, lru_cache, reduce\n"
    "from heapq import heapify, heappop, heappush\n"
    "from itertools import accumulate, combinations, permutations, product\n"
    "from bisect import bisect_left, bisect_right, insort\n"
    "from math import ceil, comb, floor, gcd, inf, isqrt, log2, sqrt\n"
)

# The function-call harness: reads the arguments (JSON) from stdin before the solution runs, executes the
# solution in its own namespace (not __main__, so `if __name__ == "__main__":` blocks stay inert), calls the
# function and prints one marked JSON line last.
_CALL_HARNESS = r"""
import io as _io, json as _json, sys as _sys
_args = _json.loads(_sys.stdin.read())
_sys.stdin = _io.StringIO("")
_ns = {"__name__": "__solution__", "__builtins__": __builtins__}
exec(%(prelude)r, _ns)
exec(compile(%(src)r, "solution.py", "exec"), _ns)
_fn_name = %(fn_name)r
if "Solution" in _ns and hasattr(_ns["Solution"], _fn_name):
    _fn = getattr(_ns["Solution"](), _fn_name)
elif callable(_ns.get(_fn_name)):
    _fn = _ns[_fn_name]
else:
    _sys.stderr.write("harness: no function or Solution method named %%r\n" %% _fn_name)
    _sys.exit(3)
_res = _fn(*_args)
def _default(o):
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=repr)
    return repr(o)
_sys.stdout.flush()
_sys.stdout.write("\n" + %(mark)r + _json.dumps(_res, default=_default) + "\n")
"""


@dataclasses.dataclass(frozen=True)
class CodeCase:
    """One test: ``kind="stdin"`` feeds ``stdin`` and compares stdout with ``expected`` (a string);
    ``kind="call"`` calls ``fn_name(*args)`` and compares the result with ``expected`` (a JSON value)."""

    kind: str
    stdin: str = ""
    args: tuple = ()
    expected: Any = None
    fn_name: str | None = None


def extract_program(response: str) -> str:
    """The last ```python (or ```py) fenced block of ``response``; else its last untagged block; else the text."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(response)]
    for lang, body in reversed(blocks):
        if lang in ("python", "python3", "py"):
            return body
    for lang, body in reversed(blocks):
        if lang == "":
            return body
    return response


# --------------------------------------------------------------------------------------------------------------
# Test parsing
# --------------------------------------------------------------------------------------------------------------
def _as_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value) + ("\n" if value else "")
    raise ValueError(f"{where}: expected a string (or a list of lines), got {type(value).__name__}")


def _parse_call_args(value: Any, where: str) -> tuple:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str):  # LiveCodeBench: one JSON value per line
        try:
            return tuple(json.loads(line) for line in value.split("\n") if line.strip())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: functional input is not one JSON value per line: {e}") from None
    raise ValueError(f"{where}: expected a list of arguments or a string of JSON lines, got {type(value).__name__}")


def _parse_call_expected(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def parse_tests(tests: Any, fn_name: str | None = None) -> list[CodeCase]:
    """Normalize ``tests`` (an object or JSON text, formats in the module docstring) into :class:`CodeCase` s.

    Raises ValueError naming the offending field (e.g. ``tests.outputs[2]``).
    """
    if isinstance(tests, (str, bytes)):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            raise ValueError(f"tests: not valid JSON ({e})") from None
    if isinstance(tests, dict) and "tests" in tests:
        meta = tests.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"tests.metadata: expected an object, got {type(meta).__name__}")
        fn_name = fn_name or tests.get("fn_name") or meta.get("func_name")
        tests = tests["tests"]
        prefix = "tests.tests"
    else:
        prefix = "tests"
    if fn_name is not None and (not isinstance(fn_name, str) or not fn_name.isidentifier()):
        raise ValueError(f"fn_name: expected a Python identifier, got {fn_name!r}")
    if isinstance(tests, dict):
        cases = _parse_columns(tests, fn_name, prefix)
    elif isinstance(tests, list):
        cases = _parse_rows(tests, fn_name, prefix)
    else:
        raise ValueError(
            f"{prefix}: expected an object with 'inputs'/'outputs' or a list of {{'input', 'output'}} objects, "
            f"got {type(tests).__name__}"
        )
    if not cases:
        raise ValueError(f"{prefix}: no test cases")
    return cases


def _parse_columns(tests: dict, fn_name: str | None, prefix: str) -> list[CodeCase]:
    for key in ("inputs", "outputs"):
        if key not in tests:
            raise ValueError(f"{prefix}.{key}: missing (have {sorted(tests)})")
        if not isinstance(tests[key], list):
            raise ValueError(f"{prefix}.{key}: expected a list, got {type(tests[key]).__name__}")
    inputs, outputs = tests["inputs"], tests["outputs"]
    if len(inputs) != len(outputs):
        raise ValueError(f"{prefix}.outputs: has {len(outputs)} entries but {prefix}.inputs has {len(inputs)}")
    name = tests.get("fn_name") or fn_name
    if name is not None and (not isinstance(name, str) or not name.isidentifier()):
        raise ValueError(f"{prefix}.fn_name: expected a Python identifier, got {name!r}")
    if name:
        return [
            CodeCase("call", args=_parse_call_args(i, f"{prefix}.inputs[{k}]"), expected=_parse_call_expected(o),
                     fn_name=name)
            for k, (i, o) in enumerate(zip(inputs, outputs))
        ]
    return [
        CodeCase("stdin", stdin=_as_text(i, f"{prefix}.inputs[{k}]"), expected=_as_text(o, f"{prefix}.outputs[{k}]"))
        for k, (i, o) in enumerate(zip(inputs, outputs))
    ]


_STDIN_TYPES = {"stdin", "stdin_stdout"}
_CALL_TYPES = {"functional", "function_call"}


def _parse_rows(rows: list, fn_name: str | None, prefix: str) -> list[CodeCase]:
    cases = []
    for k, row in enumerate(rows):
        where = f"{prefix}[{k}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with 'input' and 'output', got {type(row).__name__}")
        for key in ("input", "output"):
            if key not in row:
                raise ValueError(f"{where}.{key}: missing (have {sorted(row)})")
        type_key = "testtype" if "testtype" in row else "type"
        ttype = row.get(type_key, "stdin")
        if ttype in _STDIN_TYPES:
            cases.append(CodeCase("stdin", stdin=_as_text(row["input"], f"{where}.input"),
                                  expected=_as_text(row["output"], f"{where}.output")))
        elif ttype in _CALL_TYPES:
            name = row.get("fn_name") or fn_name
            if not name or not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"{where}.fn_name: a {ttype} test needs a function name (pass fn_name=, or "
                                 f"'fn_name' / 'metadata.func_name' next to 'tests'); got {name!r}")
            cases.append(CodeCase("call", args=_parse_call_args(row["input"], f"{where}.input"),
                                  expected=_parse_call_expected(row["output"]), fn_name=name))
        else:
            raise ValueError(f"{where}.{type_key}: unknown value {ttype!r} (expected one of "
                             f"{sorted(_STDIN_TYPES | _CALL_TYPES)})")
    return cases


# --------------------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------------------
def _tokens(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def _token_equal(a: str, b: str, rel: float, abs_: float) -> bool:
    if a == b:
        return True
    if _INT.fullmatch(a) and _INT.fullmatch(b):
        return int(a) == int(b)  # exact: floats would merge large integers
    if _NUM.fullmatch(a) and _NUM.fullmatch(b):
        return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_)
    return False


def outputs_match(actual: str, expected: str, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    """Whitespace-normalized line comparison with numeric tolerance (see module docstring)."""
    a, e = _tokens(actual), _tokens(expected)
    if len(a) != len(e):
        return False
    for la, le in zip(a, e):
        if len(la) != len(le) or not all(_token_equal(x, y, rel_tol, abs_tol) for x, y in zip(la, le)):
            return False
    return True


def values_match(actual: Any, expected: Any, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    """Structural equality of JSON values; numbers (not bools) within tolerance, ints exactly."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected if isinstance(actual, bool) and isinstance(expected, bool) else False
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        if isinstance(actual, int) and isinstance(expected, int):
            return actual == expected
        return math.isclose(float(actual), float(expected), rel_tol=rel_tol, abs_tol=abs_tol)
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(
            values_match(x, y, rel_tol, abs_tol) for x, y in zip(actual, expected)
        )
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(
            values_match(actual[k], expected[k], rel_tol, abs_tol) for k in actual
        )
    return actual == expected


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------
def _program_and_stdin(code: str, case: CodeCase) -> tuple[str, bytes]:
    if case.kind == "stdin":
        return code, case.stdin.encode("utf-8")
    prog = _CALL_HARNESS % {"prelude": _CALL_PRELUDE, "src": code, "fn_name": case.fn_name, "mark": _RESULT_MARK}
    return prog, json.dumps(list(case.args)).encode("utf-8")


def _judge(case: CodeCase, res: SandboxResult, cfg: CodeRewardConfig) -> tuple[bool, str]:
    if res.limit_hit is not None:  # set only for runs that did not end cleanly (see sandbox/execute.py::_classify)
        return False, _LIMIT_REASON.get(res.limit_hit, res.limit_hit)
    if res.signal is not None:
        return False, f"killed:{signal.Signals(res.signal).name}"
    if res.exit_code != 0:
        return False, "runtime_error"
    out = res.stdout.decode("utf-8", "replace")
    if case.kind == "stdin":
        ok = outputs_match(out, case.expected, cfg.float_rel_tol, cfg.float_abs_tol)
        return ok, "passed" if ok else "wrong_answer"
    marked = [line for line in out.splitlines() if line.startswith(_RESULT_MARK)]
    if not marked:
        return False, "runtime_error"  # exited 0 without returning (e.g. the solution called sys.exit)
    try:
        value = json.loads(marked[-1][len(_RESULT_MARK):])
    except json.JSONDecodeError:
        return False, "wrong_answer"
    exp = case.expected
    ok = values_match(value, exp, cfg.float_rel_tol, cfg.float_abs_tol) or (
        isinstance(exp, list) and len(exp) == 1 and values_match(value, exp[0], cfg.float_rel_tol, cfg.float_abs_tol)
    )
    return ok, "passed" if ok else "wrong_answer"


def _detail(k: int, ok: bool, reason: str, res: SandboxResult | None) -> dict:
    d: dict[str, Any] = {"index": k, "passed": ok, "reason": reason}
    if res is not None:
        d.update(
            exit_code=res.exit_code, signal=res.signal, limit_hit=res.limit_hit, killed_reason=res.killed_reason,
            wall_s=round(res.wall_s, 4), cpu_s=round(res.cpu_s, 4),
            stdout_head=res.stdout[:200].decode("utf-8", "replace"),
            stderr_tail=res.stderr[-400:].decode("utf-8", "replace"),
        )
    return d


def code_reward(
    response: str, tests: Any, cfg: CodeRewardConfig | None = None, fn_name: str | None = None
) -> dict[str, Any]:
    """Score ``response`` against ``tests``: ``{reward, passed, failed, error, details}``.

    ``error`` is None when every test passed, else ``"test <i>: <reason>"`` for the first failure (reasons:
    wrong_answer, runtime_error, timeout, cpu_limit, memory_limit, output_limit, file_size_limit, process_limit,
    open_files_limit, killed:<SIGNAL>, program_timeout (``program_timeout_s`` ran out), skipped; ``no_code`` when
    the response holds no program).
    Raises ValueError for malformed tests and SandboxUnavailable when the sandbox cannot start.
    """
    cfg = cfg or CodeRewardConfig()
    cases = parse_tests(tests, fn_name)
    if cfg.max_tests is not None:
        cases = cases[: cfg.max_tests]
    code = extract_program(response)
    if not code.strip():
        return {"reward": 0.0, "passed": 0, "failed": len(cases), "error": "no_code", "details": []}
    jobs = [_program_and_stdin(code, c) for c in cases]
    results: list[SandboxResult | None] = [None] * len(cases)
    verdicts: list[tuple[bool, str]] = [(False, "skipped")] * len(cases)
    # Without partial credit one failure decides the reward, so run in waves of num_workers and stop early.
    early_exit = not cfg.partial_credit and cfg.stop_on_first_failure
    wave = cfg.num_workers if (early_exit or cfg.program_timeout_s is not None) else len(cases)
    deadline = None if cfg.program_timeout_s is None else time.monotonic() + cfg.program_timeout_s
    for start in range(0, len(cases), wave):
        idx = range(start, min(start + wave, len(cases)))
        limits = cfg.sandbox
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0.05:  # the response's budget is spent: the remaining tests fail without running
                for i in range(start, len(cases)):
                    verdicts[i] = (False, "program_timeout")
                break
            if left < limits.wall_timeout_s:
                limits = limits.model_copy(update={"wall_timeout_s": left})
        outs = run_many([jobs[i][0] for i in idx], [jobs[i][1] for i in idx], limits, cfg.num_workers)
        for i, res in zip(idx, outs):
            results[i] = res
            verdicts[i] = _judge(cases[i], res, cfg)
        if early_exit and not all(verdicts[i][0] for i in idx):
            break
    passed = sum(ok for ok, _ in verdicts)
    failed = len(cases) - passed
    if passed == len(cases):
        reward = 1.0
    else:
        reward = passed / len(cases) if cfg.partial_credit else 0.0
    first_fail = next((k for k, (ok, _) in enumerate(verdicts) if not ok), None)
    return {
        "reward": reward,
        "passed": passed,
        "failed": failed,
        "error": None if first_fail is None else f"test {first_fail}: {verdicts[first_fail][1]}",
        "details": [_detail(k, ok, why, results[k]) for k, (ok, why) in enumerate(verdicts)],
    }


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def main_code(argv: Sequence[str] | None = None) -> int:
    """``oapl-reward code``: score one program file against one tests file; prints one JSON object.

    Exit status 0 when the program was judged (whatever the reward), 2 for unreadable or malformed input.
    """
    ap = argparse.ArgumentParser(prog="oapl-reward code", description="Score a code answer against tests.")
    ap.add_argument("--program", required=True, help="File with the model response or program ('-' = stdin).")
    ap.add_argument("--tests", required=True, help="JSON file with the tests (DeepCoder/LiveCodeBench formats).")
    ap.add_argument("--fn-name", default=None, help="Function name for functional tests without one.")
    ap.add_argument("--partial-credit", action="store_true", help="Reward = passed fraction.")
    ap.add_argument("--num-workers", type=int, default=2, help="Test cases run in parallel.")
    ap.add_argument("--timeout", type=float, default=10.0, help="Wall-clock limit per test case, seconds.")
    ap.add_argument("--memory-mb", type=int, default=1024, help="Memory limit per test case, MiB.")
    args = ap.parse_args(argv)

    def invalid(msg: str) -> int:
        print(json.dumps({"reward": 0.0, "passed": 0, "failed": 0, "error": msg}))
        return 2

    try:
        cfg = CodeRewardConfig(
            partial_credit=args.partial_credit, num_workers=args.num_workers,
            sandbox=SandboxConfig(wall_timeout_s=args.timeout, cpu_time_s=max(1, math.ceil(args.timeout)),
                                  memory_bytes=args.memory_mb * 2**20),
        )
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        return invalid(f"invalid option: {e}")
    try:
        if args.program == "-":
            response = sys.stdin.read()
        else:
            with open(args.program, encoding="utf-8") as f:
                response = f.read()
        with open(args.tests, encoding="utf-8") as f:
            tests_text = f.read()
    except OSError as e:
        return invalid(f"cannot read {e.filename}: {e.strerror}")
    try:
        parse_tests(tests_text, args.fn_name)  # validate before any sandbox starts
    except ValueError as e:
        return invalid(f"invalid input {args.tests}: {e}")
    result = code_reward(response, tests_text, cfg, fn_name=args.fn_name)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main_code())
