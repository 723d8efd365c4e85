"""Build the task named by the config's ``task.type`` (one place that maps config classes to task classes)."""

from __future__ import annotations

from oapl_megatron.config.code import CodeDatasetTaskConfig, SyntheticCodeTaskConfig
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
    if isinstance(cfg, CodeDatasetTaskConfig):
        from oapl_megatron.tasks.code_dataset import CodeDatasetTask

        return CodeDatasetTask.from_config(cfg, tokenizer)
    if isinstance(cfg, SyntheticCodeTaskConfig):
        from oapl_megatron.tasks.synthetic_code import SyntheticCodeTask

        return SyntheticCodeTask(cfg, eos_text=tokenizer.eos_token)
    raise ValueError(f"task.type={getattr(cfg, 'type', None)!r} has no task implementation")


def reward_workers(task: Task) -> int:
    """Scoring threads the reward pool should use for ``task``: code tasks say (``task.reward_pool.workers``);
    other tasks score in microseconds and get one."""
    return int(getattr(task, "reward_workers", 1))
