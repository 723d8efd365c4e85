"""Tests of the synthetic arithmetic task, its config, and the locally built character tokenizer.

Oracles: Python's own integer arithmetic (``eval`` of the expression) for answers; transformers' AutoTokenizer and
vLLM's tokenizer loader + its engine-side incremental detokenizer for the tokenizer files.
"""

from __future__ import annotations

import itertools
import re
import time

import pytest
from pydantic import ValidationError

from oapl_megatron.config.task import SyntheticTaskConfig
from oapl_megatron.tasks.base import Prompt, Task
from oapl_megatron.tasks.synthetic import SyntheticArithmeticTask
from oapl_megatron.tasks.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer, char_vocab, decode_completion

LINE = re.compile(r"(-?\d+)([+-])(\d+)=(-?\d+)")


def make_task(**kw) -> SyntheticArithmeticTask:
    kw.setdefault("eval_size", 300)
    return SyntheticArithmeticTask(SyntheticTaskConfig(**kw))


def expr_of(prompt: Prompt) -> str:
    assert prompt.text.endswith("=\n"), prompt.text
    return prompt.text[:-2]


def check_chain(prompt: Prompt, completion: str) -> list[bool]:
    """Independent parse of a worked completion: per line, is ``left op right == result``? Asserts the format and
    that each line continues from the previous result and the operands match the prompt."""
    *lines, final = completion.split("\n")
    operands = re.findall(r"\d+", expr_of(prompt))
    ops = re.findall(r"[+-]", expr_of(prompt))
    assert len(lines) == len(ops)
    ok, prev = [], int(operands[0])
    for k, line in enumerate(lines):
        m = LINE.fullmatch(line)
        assert m, line
        left, op, right, res = int(m[1]), m[2], int(m[3]), int(m[4])
        assert left == prev and op == ops[k] and right == int(operands[k + 1]), (line, prev)
        ok.append(res == (left + right if op == "+" else left - right))
        prev = res
    assert final == f"#{prev}"
    return ok


# ----------------------------------------------------------------------------------------------------------------
# task


def test_is_a_task_and_answers_match_python_arithmetic():
    task = make_task(operators="+-", max_terms=4)
    assert isinstance(task, Task)
    for p in itertools.chain(itertools.islice(task.train_prompts(0), 300), task.eval_prompts()):
        assert int(p.answer) == eval(expr_of(p))  # noqa: S307 - digits and +/- only, checked by the regexes above
        assert all(check_chain(p, task.solution(p)))
        assert task.reward(p, task.solution(p) + "</s>").reward == 1.0


def test_determinism():
    a, b = make_task(operators="+-"), make_task(operators="+-")
    take = lambda t, s: [p for p in itertools.islice(t.train_prompts(s), 200)]  # noqa: E731
    assert take(a, 3) == take(b, 3)
    assert take(a, 3) != take(a, 4)
    assert a.eval_prompts() == b.eval_prompts() == a.eval_prompts()
    assert a.sft_examples(100, 1) == b.sft_examples(100, 1)
    assert a.sft_examples(100, 1) != a.sft_examples(100, 2)
    # the eval set depends on config.seed only, not on the training seed
    assert make_task(seed=5).eval_prompts() != a.eval_prompts()
    # ids are functions of the problem: distinct problems, distinct ids; same problem, same id across streams
    evals = a.eval_prompts()
    assert len({p.id for p in evals}) == len(evals)
    small = [make_task(max_terms=2, max_digits=1, eval_size=5, seed=s) for s in (0, 1)]
    ids = [{expr_of(p): p.id for p in itertools.islice(t.train_prompts(0), 500)} for t in small]
    common = ids[0].keys() & ids[1].keys()
    assert common and all(ids[0][e] == ids[1][e] for e in common)


def test_splits_are_disjoint_and_sized():
    task = make_task(eval_size=500)
    evals = task.eval_prompts()
    eval_exprs = {expr_of(p) for p in evals}
    assert len(evals) == len(eval_exprs) == 500
    assert all(p.meta["split"] == "eval" for p in evals)
    train_exprs = set()
    for seed in range(3):
        train_exprs |= {expr_of(p) for p in itertools.islice(task.train_prompts(seed), 5000)}
    sft_exprs = {expr_of(e.prompt) for e in task.sft_examples(3000, 0)}
    assert not eval_exprs & train_exprs and not eval_exprs & sft_exprs
    assert all(task.is_eval_problem(e) for e in eval_exprs) and not any(map(task.is_eval_problem, train_exprs))
    # The split is a property of the problem: the hash buckets ~eval_fraction of all problems into eval.
    draws = [f"{i}+{j}" for i in range(100) for j in range(100)]
    frac = sum(task.is_eval_problem(d) for d in draws) / len(draws)
    assert abs(frac - 0.1) < 4 * (0.1 * 0.9 / len(draws)) ** 0.5, frac  # 4 sigma


def test_small_problem_space():
    # 2 one-digit terms: 100 problems, ~10 in eval; asking for 5 eval prompts works, for 100 fails at config time.
    task = make_task(max_terms=2, max_digits=1, eval_size=5)
    assert len({expr_of(p) for p in task.eval_prompts()}) == 5
    with pytest.raises(ValidationError, match=r"task.eval_size=100 is too large .* at most 5"):
        SyntheticTaskConfig(max_terms=2, max_digits=1, eval_size=100)


@pytest.mark.parametrize(
    "response,reward,reason",
    [
        ("12+345=357\n357+6=363\n#363</s>", 1.0, "ok"),
        ("#363</s>", 1.0, "ok"),  # only the final answer is graded
        ("12+345=358\n358+6=363\n#363</s>", 1.0, "ok"),  # slip in a partial sum, right answer
        ("12+345=357\n357+6=364\n#364</s>", 0.0, "wrong_answer"),
        ("12+345=357\n357+6=363\n#0363</s>", 0.0, "wrong_answer"),  # exact string
        ("12+345=357\n357+6=363\n#363", 0.0, "no_eos"),  # cut at the length limit
        ("12+345=357\n357+6=363\n#363\n</s>", 0.0, "no_answer_line"),
        ("12+345=357\n357+6=363\n#363 </s>", 0.0, "no_answer_line"),
        ("12+345=357\n357+6=363\n#363\n#12</s>", 0.0, "wrong_answer"),  # the last line counts
        ("12+345=357\n357+6=363\n#363+1</s>", 0.0, "no_answer_line"),
        ("#363</s>+1", 0.0, "no_eos"),  # garbage after EOS
        ("#363</s>#363</s>", 0.0, "text_after_eos"),
        ("12+345=357\n357+6=363</s>", 0.0, "no_answer_line"),
        ("", 0.0, "no_eos"),
        ("</s>", 0.0, "no_answer_line"),
    ],
)
def test_reward_parser(response, reward, reason):
    task = make_task()
    prompt = Prompt(id="x", text="12+345+6=\n", answer="363", meta={"terms": [12, 345, 6], "ops": ["+", "+"]})
    res = task.reward(prompt, response)
    assert (res.reward, res.info["reason"]) == (reward, reason), res


def test_reward_negative_answers_and_custom_eos():
    task = SyntheticArithmeticTask(SyntheticTaskConfig(operators="-", eval_size=10), eos_text="<|end|>")
    prompt = Prompt(id="x", text="5-17=\n", answer="-12", meta={})
    assert task.reward(prompt, "5-17=-12\n#-12<|end|>").reward == 1.0
    assert task.reward(prompt, "5-17=-12\n#12<|end|>").info["reason"] == "wrong_answer"
    assert task.reward(prompt, "5-17=-12\n#-12</s>").info["reason"] == "no_eos"


def test_sft_examples_corruption():
    task = make_task(operators="+-", max_terms=4, sft_corrupt_frac=0.25)
    examples = task.sft_examples(400, seed=7)
    corrupted = [e for e in examples if e.corrupted]
    assert len(corrupted) == 100  # round(400 · 0.25), exact
    for e in examples:
        ok = check_chain(e.prompt, e.completion)  # format and chaining hold for every example
        reward = task.reward(e.prompt, e.completion + "</s>").reward
        if not e.corrupted:
            assert all(ok) and e.completion == task.solution(e.prompt) and reward == 1.0
            continue
        # exactly one wrong line, whose result differs from the right one in exactly one digit; carried through
        assert ok.count(False) == 1 and reward == 0.0
        k = ok.index(False)
        left, op, right, res = LINE.fullmatch(e.completion.split("\n")[k]).groups()
        right_value = str(int(left) + int(right) if op == "+" else int(left) - int(right))
        got, want = res.lstrip("-"), right_value.lstrip("-")
        assert len(got) == len(want) and sum(x != y for x, y in zip(got, want)) == 1, (res, right_value)
        assert res.startswith("-") == right_value.startswith("-") or got == "0"  # "-5" → "-0" prints as "0"
    assert len(task.sft_examples(10, 0, corrupt_frac=0.0)) == 10
    assert all(e.corrupted for e in task.sft_examples(10, 0, corrupt_frac=1.0))
    with pytest.raises(ValueError, match="corrupt_frac"):
        task.sft_examples(10, 0, corrupt_frac=1.5)


def test_max_response_tokens_bounds_every_solution():
    for kw in ({}, {"operators": "-", "max_terms": 5, "max_digits": 4}, {"min_digits": 2, "max_digits": 2}):
        task = make_task(**kw)
        longest = max(len(task.solution(p)) + 1 for p in itertools.islice(task.train_prompts(0), 3000))
        assert longest <= task.max_response_tokens() < 4 * longest


def test_config_validation():
    with pytest.raises(ValidationError, match="task.min_terms=4 exceeds task.max_terms=3"):
        SyntheticTaskConfig(min_terms=4, max_terms=3)
    with pytest.raises(ValidationError, match="task.min_digits=3 exceeds task.max_digits=2"):
        SyntheticTaskConfig(min_digits=3, max_digits=2)
    with pytest.raises(ValidationError, match="operators"):
        SyntheticTaskConfig(operators="*")
    with pytest.raises(ValidationError, match="max_termz"):
        SyntheticTaskConfig(max_termz=3)
    with pytest.raises(ValidationError, match="sft_corrupt_frac"):
        SyntheticTaskConfig(sft_corrupt_frac=1.2)
    assert SyntheticTaskConfig(max_terms=2, max_digits=1, eval_size=5).problem_space_size() == 100
    assert SyntheticTaskConfig(min_terms=2, max_terms=3, min_digits=2, max_digits=2, operators="+-",
                               eval_size=10).problem_space_size() == 90**2 * 2 + 90**3 * 4


def test_eval_prompts_fast():
    t0 = time.perf_counter()
    make_task(eval_size=1000).eval_prompts()
    assert time.perf_counter() - t0 < 5.0


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("char_tok")
    tok = build_char_tokenizer(d)
    # A tiny model config next to the tokenizer, as the demo writes it (vLLM reads config.json when it loads).
    LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(d)
    return d


def sample_texts() -> list[tuple[str, str]]:
    task = make_task(operators="+-")
    return [(e.prompt.text, e.completion) for e in task.sft_examples(200, 0, corrupt_frac=0.5)]


def test_tokenizer_round_trip_transformers(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.is_fast and len(tok) == 4 + len(DEFAULT_ALPHABET) == len(char_vocab())
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    vocab = char_vocab()
    for prompt, completion in sample_texts():
        ids = tok(prompt + completion)["input_ids"]
        # one token per character, BOS first
        assert ids == [1] + [vocab[c] for c in prompt + completion]
        assert tok.decode(ids, skip_special_tokens=True) == prompt + completion
        comp_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert decode_completion(tok, comp_ids) == completion + "</s>"
    assert tok.decode(tok("1 + 2\n", add_special_tokens=False)["input_ids"]) == "1 + 2\n"  # spaces kept
    assert tok("a", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    with pytest.raises(ValueError, match="repeated"):
        char_vocab("112")
    with pytest.raises(ValueError, match="not allowed"):
        char_vocab("12<")


def test_tokenizer_loads_in_vllm_and_detokenizes_incrementally(tok_dir):
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.tokenizers import get_tokenizer
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer, IncrementalDetokenizer

    vtok = get_tokenizer(str(tok_dir))
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert vtok.eos_token_id == hf.eos_token_id and len(vtok) == len(hf)
    task = make_task(operators="+-")
    for i, (prompt, completion) in enumerate(sample_texts()[:40]):
        prompt_ids = vtok.encode(prompt)
        assert prompt_ids == hf(prompt)["input_ids"]
        out_ids = vtok.encode(completion, add_special_tokens=False) + [vtok.eos_token_id]
        # The engine's own detokenizer, fed one token at a time as the scheduler does; the last token stops on EOS.
        request = EngineCoreRequest(
            request_id=f"r{i}", prompt_token_ids=prompt_ids, mm_features=None,
            sampling_params=SamplingParams(max_tokens=len(out_ids)), pooling_params=None,
            arrival_time=time.time(), lora_request=None, cache_salt=None, data_parallel_rank=None,
        )
        detok = IncrementalDetokenizer.from_new_request(vtok, request)
        assert isinstance(detok, FastIncrementalDetokenizer)
        for j, t in enumerate(out_ids):
            detok.update([t], stop_terminated=j == len(out_ids) - 1)
        assert detok.get_next_output_text(finished=True, delta=False) == completion  # vLLM drops the EOS text
        assert detok.output_token_ids == out_ids
        text = decode_completion(vtok, detok.output_token_ids)  # what the rollout hands to reward()
        p = Prompt(id="p", text=prompt, answer=completion.rsplit("#", 1)[1], meta={})
        assert task.reward(p, text).reward == 1.0
