"""The synthetic code task of the CPU code demo: disjoint, deterministic splits; warm-start data with exactly the
requested share of mistakes, each of which really fails in the sandbox; rewards from running the program.

Run: ``python -m pytest tests/test_synthetic_code.py -q`` (a few seconds: ~40 sandboxed programs).
"""

from __future__ import annotations

import itertools

import pytest

from oapl_megatron.config.code import SyntheticCodeTaskConfig
from oapl_megatron.tasks.synthetic_code import CODE_ALPHABET, SyntheticCodeTask, render_program
from oapl_megatron.tasks.tokenizer import EOS, char_vocab

TASK = SyntheticCodeTask(SyntheticCodeTaskConfig(operations="sum,max,min,sub,mul", eval_size=50))


def test_splits_are_disjoint_and_deterministic():
    evals = TASK.eval_prompts()
    assert len({p.text for p in evals}) == 50
    train = list(itertools.islice(TASK.train_prompts(seed=3), 500))
    assert not {p.text for p in train} & {p.text for p in evals}
    again = SyntheticCodeTask(SyntheticCodeTaskConfig(operations="sum,max,min,sub,mul", eval_size=50))
    assert [p.text for p in again.eval_prompts()] == [p.text for p in evals]
    assert [p.text for p in itertools.islice(again.train_prompts(seed=3), 500)] == [p.text for p in train]
    assert [p.text for p in itertools.islice(TASK.train_prompts(seed=4), 50)] != [p.text for p in train[:50]]


def test_programs_and_alphabet():
    assert render_program("max", (12, 7, 40)) == "print(max(12,7,40))"
    assert render_program("sub", (9, 3, 1)) == "print(9-3-1)"
    assert set(CODE_ALPHABET) <= set(char_vocab(CODE_ALPHABET))  # the tokenizer accepts it
    longest = max(len(TASK.solution(p)) + 1 for p in TASK.eval_prompts())
    assert longest <= TASK.max_response_tokens()


def test_sft_noise_is_exact_and_every_mistake_fails_in_the_sandbox():
    ex = TASK.sft_examples(40, seed=0, noise_frac=0.5)
    bad = [e for e in ex if e.mistake]
    assert len(bad) == 20 and {e.mistake for e in bad} <= {"operand", "function", "syntax"}
    for e in ex[:24]:
        r = TASK.reward(e.prompt, e.completion + EOS)
        if e.mistake is None:
            assert (r.reward, r.info["reason"]) == (1.0, "passed"), e
        elif e.mistake == "syntax":
            assert (r.reward, r.info["reason"]) == (0.0, "runtime_error"), e
        elif r.reward == 1.0:  # a changed operand that is not the max/min does not change the value
            assert e.mistake == "operand" and e.prompt.meta["op"] in ("max", "min"), e


@pytest.mark.parametrize("response, reward, reason, runs", [
    ("{solution}{eos}", 1.0, "passed", 1),
    ("print({answer}){eos}", 1.0, "passed", 1),  # any program that prints the value
    ("print({answer})", 0.0, "no_eos", 0),  # cut at the length limit: not run
    ("{solution}{eos}x{eos}", 0.0, "text_after_eos", 0),
    ("{eos}", 0.0, "no_code", 0),
    ("print({answer}+1){eos}", 0.0, "wrong_answer", 1),
    ("import time;time.sleep(60){eos}", 0.0, "timeout", 1),
])
def test_reward_cases(response, reward, reason, runs):
    task = SyntheticCodeTask(SyntheticCodeTaskConfig(
        reward={"num_workers": 1, "sandbox": {"wall_timeout_s": 1.0, "cpu_time_s": 1, "memory_bytes": 256 * 2**20}}))
    p = task.eval_prompts()[0]
    text = response.format(solution=task.solution(p), answer=p.answer, eos=EOS)
    r = task.reward(p, text)
    assert (r.reward, r.info["reason"], r.info["sandbox_runs"]) == (reward, reason, runs)
