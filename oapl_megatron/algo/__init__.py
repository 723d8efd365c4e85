"""Pure-torch RL math: OAPL loss and value estimate, GRPO/IS baselines, lag arithmetic.

No torch.distributed, Megatron or vLLM imports here: every function takes explicit denominators and returns
``(loss, metrics)``; tests compare them to float64 references on CPU (tests/test_algo.py).
"""

from oapl_megatron.algo.grpo import grpo_advantages, grpo_loss
from oapl_megatron.algo.lag import StaleSampleError, SyncSchedule, check_staleness, staleness
from oapl_megatron.algo.oapl import (
    oapl_advantages,
    oapl_loss,
    oapl_sequence_loss,
    sequence_logprobs,
    zero_signal_fraction,
)
from oapl_megatron.algo.value import value_estimate

__all__ = [
    "StaleSampleError",
    "SyncSchedule",
    "check_staleness",
    "grpo_advantages",
    "grpo_loss",
    "oapl_advantages",
    "oapl_loss",
    "oapl_sequence_loss",
    "sequence_logprobs",
    "staleness",
    "value_estimate",
    "zero_signal_fraction",
]
