"""Pack a step's sequences (prompt + response token ids) into equal-shape micro-batches for the Megatron schedule.

Layout of one sequence of prompt length p and response length r, right-padded to the step length S + 1:

    full   = prompt ‖ response ‖ pad            (S + 1 tokens)
    tokens = full[:-1]     targets = full[1:]   (S tokens each)
    mask[t] = 1  iff targets[t] is a response token   (p - 1 <= t < p + r - 1)

Every micro-batch of the step has the same [B, S] shape: the pipeline schedules exchange fixed-size activations.
The step's sequences are split over DP ranks in contiguous blocks; the block is padded with empty (all-masked)
sequences to a multiple of ``micro_batch_size`` so every DP rank runs the same number of micro-batches. The
normalisation of the loss is decided once per step from the *global* counts (``StepBatch.num_sequences``,
``num_tokens``), so the gradient does not depend on how the batch is cut (STYLE.md principle 7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SequenceRecord:
    """One sampled sequence and what the objective needs of it."""

    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float = 0.0  # OAPL: r - V*(x); GRPO: group-normalised advantage
    ref_logp: float = 0.0  # sum of the response tokens' log-probs under the inference policy
    ref_token_logps: list[float] | None = None  # per response token (GRPO ratios); len == len(response_ids)
    reward: float = 0.0
    version: int = 0  # policy version that generated it

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("SequenceRecord.prompt_ids is empty: a prompt needs at least one token")
        if self.ref_token_logps is not None and len(self.ref_token_logps) != len(self.response_ids):
            raise ValueError(
                f"SequenceRecord.ref_token_logps has {len(self.ref_token_logps)} entries for "
                f"{len(self.response_ids)} response tokens"
            )


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [B, S] int64
    targets: torch.Tensor  # [B, S] int64
    mask: torch.Tensor  # [B, S] float32, 1 on response-token targets
    position_ids: torch.Tensor  # [B, S] int64
    advantage: torch.Tensor  # [B] float32
    ref_logp: torch.Tensor  # [B] float32 (sequence sums)
    ref_token_logp: torch.Tensor  # [B, S] float32, aligned with targets (0 off the mask)
    valid: torch.Tensor  # [B] float32, 0 for DP padding sequences

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


@dataclass
class StepBatch:
    """This DP rank's micro-batches plus the global denominators of the step."""

    micro_batches: list[MicroBatch]
    seq_len: int  # S
    micro_batch_size: int
    num_sequences: int  # global count of real sequences in the step (all DP ranks)
    num_tokens: int  # global count of response tokens in the step
    extra: dict = field(default_factory=dict)


def step_seq_len(records: list[SequenceRecord], multiple: int = 8) -> int:
    """S for the step: the longest prompt+response minus one, rounded up to ``multiple`` (fewer distinct shapes)."""
    longest = max(len(r.prompt_ids) + len(r.response_ids) for r in records)
    return max(multiple, math.ceil((longest - 1) / multiple) * multiple)


def _pack(records: list[SequenceRecord | None], seq_len: int, pad_id: int) -> MicroBatch:
    b = len(records)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((b, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, seq_len), dtype=torch.float32)
    ref_tok = torch.zeros((b, seq_len), dtype=torch.float32)
    adv = torch.zeros(b, dtype=torch.float32)
    ref = torch.zeros(b, dtype=torch.float32)
    valid = torch.zeros(b, dtype=torch.float32)
    for i, rec in enumerate(records):
        if rec is None:
            continue
        full = rec.prompt_ids + rec.response_ids
        n = len(full) - 1  # number of (token, target) pairs
        if n > seq_len:
            raise ValueError(f"sequence of {len(full)} tokens does not fit the step length {seq_len} + 1")
        full_t = torch.tensor(full, dtype=torch.long)
        tokens[i, :n] = full_t[:-1]
        targets[i, :n] = full_t[1:]
        p, r = len(rec.prompt_ids), len(rec.response_ids)
        mask[i, p - 1 : p - 1 + r] = 1.0
        if rec.ref_token_logps is not None:
            ref_tok[i, p - 1 : p - 1 + r] = torch.tensor(rec.ref_token_logps, dtype=torch.float32)
        adv[i] = rec.advantage
        ref[i] = rec.ref_logp
        valid[i] = 1.0
    pos = torch.arange(seq_len, dtype=torch.long).unsqueeze(0).expand(b, seq_len).contiguous()
    return MicroBatch(tokens, targets, mask, pos, adv, ref, ref_tok, valid)


def build_step_batch(records: list[SequenceRecord], *, dp_rank: int, dp_size: int, micro_batch_size: int,
                     pad_id: int, seq_len: int | None = None) -> StepBatch:
    """Cut the step's global list of sequences into this DP rank's micro-batches (every rank passes the same list)."""
    if not records:
        raise ValueError("build_step_batch: the step has no sequences")
    seq_len = seq_len or step_seq_len(records)
    per_rank = math.ceil(len(records) / dp_size)
    per_rank = math.ceil(per_rank / micro_batch_size) * micro_batch_size
    padded: list[SequenceRecord | None] = list(records) + [None] * (per_rank * dp_size - len(records))
    mine = padded[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    mbs = [_pack(mine[i : i + micro_batch_size], seq_len, pad_id) for i in range(0, per_rank, micro_batch_size)]
    num_tokens = sum(len(r.response_ids) for r in records)
    return StepBatch(mbs, seq_len, micro_batch_size, num_sequences=len(records), num_tokens=num_tokens)
