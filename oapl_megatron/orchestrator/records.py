"""Turn scored groups from the rollout buffer into the trainer's per-sequence records.

Advantages are computed here, once per step, from whole groups — OAPL: A = r − V̂*(x) with the soft-max value
estimate (β₁); GRPO: group-normalised rewards — so sequences of one group may land in different micro-batches
or DP ranks without changing the loss.
"""

from __future__ import annotations

import torch

from oapl_megatron.algo import grpo_advantages, oapl_advantages
from oapl_megatron.config.schema import GRPOObjective, OAPLObjective
from oapl_megatron.rollout.buffer import Group
from oapl_megatron.trainer.batch import SequenceRecord


def groups_to_records(groups: list[Group], objective: OAPLObjective | GRPOObjective) -> list[SequenceRecord]:
    g = len(groups[0].samples)
    if any(len(gr.samples) != g for gr in groups):
        raise ValueError(f"groups of different sizes in one step: {[len(gr.samples) for gr in groups]}")
    rewards = torch.tensor([gr.rewards for gr in groups], dtype=torch.float64)  # [P, G]
    if isinstance(objective, OAPLObjective):
        adv = oapl_advantages(rewards, objective.beta1)  # [P, G]
    else:
        adv = grpo_advantages(rewards, normalize_std=objective.normalize_std)
    records = []
    for p, gr in enumerate(groups):
        for i, s in enumerate(gr.samples):
            if not s.token_ids:
                continue  # an empty completion has no tokens to score
            records.append(SequenceRecord(
                prompt_ids=list(gr.prompt_token_ids),
                response_ids=list(s.token_ids),
                advantage=float(adv[p, i]),
                ref_logp=float(sum(s.token_logprobs)),
                ref_token_logps=list(s.token_logprobs),
                reward=float(gr.rewards[i]),
                version=gr.version,
            ))
    return records
