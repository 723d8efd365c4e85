"""``oapl-eval``: pass@k of a Hugging Face checkpoint on math or code benchmarks, generated with vLLM.

    oapl-eval --model ckpt/hf --data aime25.jsonl --data hmmt25.jsonl --task math --n 10 --k 1 5 10 \\
        --temperature 0.6 --top-p 0.95 --max-tokens 16384 --out runs/eval \\
        [--prompt-field problem --answer-field answer] [--instruction 'Put the final answer in \\boxed{}.']
    oapl-eval --model ckpt/hf --data lcb.jsonl --task code --n 20 --k 1 10 --out runs/eval_code \\
        --prompt-field question_content --tests-field public_test_cases --starter-code-field starter_code \\
        --metadata-field metadata

Each ``--data`` file is one benchmark: pass@k is reported for each and over all problems. Code benchmarks are read,
prompted and scored exactly as the ``code_dataset`` task trains (starter code, function names, the program after
``</think>``, fenced). Writes ``results.json``, ``results.md`` and ``samples.jsonl`` into ``--out`` (see
:mod:`oapl_megatron.orchestrator.offline_eval`).
This module only parses arguments into an :class:`~oapl_megatron.config.offline_eval.OfflineEvalConfig` and calls
:func:`oapl_megatron.orchestrator.offline_eval.run_eval`; torch and vLLM are imported after parsing (``--help`` is instant).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="oapl-eval", description="pass@k evaluation with vLLM.")
    ap.add_argument("--model", required=True, help="Hugging Face model directory.")
    ap.add_argument("--tokenizer", default=None, help="Tokenizer directory (default: the model directory).")
    ap.add_argument("--data", action="append", required=True, help="A .jsonl/.parquet/.arrow benchmark; repeatable.")
    ap.add_argument("--task", choices=["math", "code"], default="math", help="Reward: math-verify or tests.")
    ap.add_argument("--n", type=int, default=10, help="Samples per problem.")
    ap.add_argument("--k", type=int, nargs="+", default=None, help="k values of pass@k (default: 1 and n).")
    ap.add_argument("--temperature", type=float, default=0.6, help="Sampling temperature.")
    ap.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling mass.")
    ap.add_argument("--max-tokens", type=int, default=1024, help="Most tokens per response.")
    ap.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    ap.add_argument("--out", required=True, help="Output directory.")
    ap.add_argument("--prompt-field", default="prompt", help="Row field with the problem text.")
    ap.add_argument("--answer-field", default="answer", help="Row field with the reference answer (math).")
    ap.add_argument("--tests-field", default="tests", help="Row field with the tests (code).")
    ap.add_argument("--id-field", default=None, help="Row field with a problem id (default: file:line).")
    ap.add_argument("--starter-code-field", default=None, help="Row field with starter code (code).")
    ap.add_argument("--fn-name-field", default=None, help="Row field with the function name of call tests (code).")
    ap.add_argument("--metadata-field", default=None,
                    help="Row field with a JSON object holding 'func_name' (code; LiveCodeBench/DeepCoder).")
    ap.add_argument("--no-require-fence", action="store_true",
                    help="Code: also score a response without a fenced block (as the whole program).")
    ap.add_argument("--system-prompt", default=None, help="System message.")
    ap.add_argument("--instruction", default=None, help="Text appended to every problem.")
    ap.add_argument("--chat-template", choices=["auto", "required", "none"], default="auto",
                    help="Use the tokenizer's chat template (auto: when it has one).")
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="Drop (and count) longer prompts.")
    ap.add_argument("--limit", type=int, default=None, help="First N problems of each dataset.")
    ap.add_argument("--on-bad-row", choices=["error", "skip"], default="error", help="Malformed rows.")
    ap.add_argument("--max-model-len", type=int, default=None, help="vLLM context length (default: fitted).")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="Weights.")
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM TP (GPU).")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="Where vLLM runs.")
    ap.add_argument("--math-timeout", type=float, default=5.0, help="Seconds per math-verify check.")
    ap.add_argument("--no-samples", action="store_true", help="Do not write samples.jsonl.")
    return ap


def config_from_args(args: argparse.Namespace):
    """The :class:`OfflineEvalConfig` of parsed arguments (validation errors name the option's config field)."""
    from oapl_megatron.config.offline_eval import OfflineEvalConfig

    fields = {
        "prompt": args.prompt_field,
        "answer": args.answer_field if args.task == "math" else None,
        "tests": args.tests_field if args.task == "code" else None,
        "id": args.id_field,
    }
    data = [
        {
            "source": [path], "fields": fields, "shuffle": False, "system_prompt": args.system_prompt,
            "instruction": args.instruction, "chat_template": args.chat_template,
            "max_prompt_tokens": args.max_prompt_tokens, "on_bad_row": args.on_bad_row, "limit": args.limit,
        }
        for path in args.data
    ]
    ks = args.k if args.k is not None else sorted({1, args.n})
    return OfflineEvalConfig(
        model=args.model, tokenizer=args.tokenizer, task=args.task, data=data, ks=ks, out=args.out,
        sampling={"n": args.n, "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
                  "seed": args.seed},
        engine={"device": args.device, "dtype": args.dtype, "max_model_len": args.max_model_len,
                "tensor_parallel_size": args.tensor_parallel_size},
        math_reward={"timeout_s": args.math_timeout},
        code={"fields": {"starter_code": args.starter_code_field, "fn_name": args.fn_name_field,
                         "metadata": args.metadata_field}, "require_fence": not args.no_require_fence},
        save_samples=not args.no_samples,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pydantic import ValidationError

    try:
        cfg = config_from_args(args)
    except ValidationError as e:
        print(f"oapl-eval: invalid arguments:\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from oapl_megatron.tasks.datasets import DataError
    from oapl_megatron.orchestrator.offline_eval import EvalError, run_eval

    try:
        results = run_eval(cfg)
    except DataError as e:
        print(f"oapl-eval: bad data: {e}", file=sys.stderr)
        return 2
    except EvalError as e:
        print(f"oapl-eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"pass_at_k": results["pass_at_k"], "num_problems": results["num_problems"],
                      "out": cfg.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
