"""parallel.timeout_s must cover what a weight sync can make the trainer ranks wait (rank 0 drains the engines
while the others wait in the weight gather): checked when the config is loaded."""

from __future__ import annotations

import pytest

from oapl_megatron.config.loader import ConfigError, load_config
from oapl_megatron.config.rollout import RolloutConfig, WeightSyncConfig, trainer_wait_bound_s
from oapl_megatron.config.schema import RunConfig


def test_bound_is_the_longest_engine_wait_plus_two_data_plane_ops():
    assert trainer_wait_bound_s(RolloutConfig(), WeightSyncConfig()) == 3600 + 2 * 300 + 60
    assert trainer_wait_bound_s(RolloutConfig(request_timeout_s=100, start_timeout_s=900),
                                WeightSyncConfig(timeout_s=50)) == 900 + 100 + 60


def test_defaults_are_consistent():
    RunConfig()  # (every file in configs/ is loaded, with this check, by tests/test_config.py)


def test_short_trainer_timeout_names_both_fields_and_the_fix():
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, overrides=["parallel.timeout_s=600"])
    msg = str(err.value)
    for part in ("parallel.timeout_s=600", "rollout.request_timeout_s=3600", "weight_sync.timeout_s=300",
                 "raise parallel.timeout_s to at least 4260"):
        assert part in msg, msg
    # consistent when the engine-side bounds are lowered instead
    load_config(RunConfig, overrides=["parallel.timeout_s=600", "rollout.request_timeout_s=300",
                                      "rollout.start_timeout_s=300", "weight_sync.timeout_s=100"])
