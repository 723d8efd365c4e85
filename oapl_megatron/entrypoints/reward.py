"""``oapl-reward``: score one response from the command line and print one JSON object.

    oapl-reward math --response answer.txt --answer '\\frac{1}{2}'
    # {"reward": 1.0, "extracted": "0.5", "reason": "correct", "strategy": "boxed"}
    oapl-reward math --response - --answer-file gold.txt --strategies boxed --timeout 2 < answer.txt
    oapl-reward code --program answer.md --tests tests.json     # see `oapl-reward code --help`

Exit status: 0 when the response was judged (whatever the reward), 2 for unreadable or invalid input. The math
mode uses :func:`oapl_megatron.tasks.math_reward.math_reward`; the code mode is
:func:`oapl_megatron.tasks.code_reward.main_code`. Nothing heavy (torch, vLLM) is imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="oapl-reward", description="Score one response; prints one JSON object.")
    sub = ap.add_subparsers(dest="mode", required=True, metavar="{math,code}")
    m = sub.add_parser("math", help="Extract the final answer and check it with math-verify.")
    m.add_argument("--response", required=True, help="File with the model response ('-' = stdin).")
    gold = m.add_mutually_exclusive_group(required=True)
    gold.add_argument("--answer", help="Reference answer text (e.g. '\\frac{1}{2}').")
    gold.add_argument("--answer-file", help="File holding the reference answer (or a worked solution with \\boxed{}).")
    m.add_argument(
        "--strategies", nargs="+", choices=["boxed", "hash", "last_number"], default=None,
        help="Extraction strategies in order (default: boxed hash last_number).",
    )
    m.add_argument("--answer-after", default=None, help="Only search after the last occurrence (default '</think>').")
    m.add_argument("--timeout", type=float, default=None, help="Seconds one check may take (default 5).")
    # The code mode's options belong to code_reward.main_code; this entry only makes it show in --help.
    sub.add_parser("code", help="Run a program against tests in the sandbox (options: oapl-reward code --help).",
                   add_help=False)
    return ap


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["code"]:
        from oapl_megatron.tasks.code_reward import main_code  # late: sandbox machinery

        return main_code(argv[1:])
    args = _parser().parse_args(argv)

    from pydantic import ValidationError

    from oapl_megatron.config.data import MathRewardConfig
    from oapl_megatron.tasks.math_reward import math_reward

    try:
        overrides = {
            k: v
            for k, v in (("strategies", args.strategies), ("answer_after", args.answer_after),
                         ("timeout_s", args.timeout))
            if v is not None
        }
        cfg = MathRewardConfig(**overrides)
        response = _read(args.response)
        answer = args.answer if args.answer is not None else _read(args.answer_file)
    except (OSError, UnicodeDecodeError, ValidationError) as e:
        print(json.dumps({"reward": 0.0, "extracted": None, "reason": "invalid_input", "error": str(e)}))
        return 2
    if not answer.strip():
        print(json.dumps({"reward": 0.0, "extracted": None, "reason": "invalid_input", "error": "empty answer"}))
        return 2
    print(json.dumps(math_reward(response, answer, cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
