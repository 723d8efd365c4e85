"""Build the task named by the config's ``task.type`` (one place that maps config classes to task classes)."""

from __future__ import annotations

from oapl_megatron.config.data import MathDatasetTaskConfig
from oapl_megatron.config.task import SyntheticTaskConfig
from oapl_megatron.tasks.base import Task


def make_task(cfg, tokenizer) -> Task:
    if isinstance(cfg, SyntheticTaskConfig):
        from oapl_megatron.tasks.synthetic import SyntheticArithmeticTask

        return SyntheticArithmeticTask(cfg, eos_text=tokenizer.eos_token)
    if isinstance(cfg, MathDatasetTaskConfig):
        from oapl_megatron.tasks.datasets import MathDatasetTask

        return MathDatasetTask.from_config(cfg, tokenizer)
    raise ValueError(f"task.type={getattr(cfg, 'type', None)!r} has no task implementation")
