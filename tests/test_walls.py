"""The walls between roles (STYLE principle 14): what each package may import, checked on the source.

trainer/ steps a model on batches (models, batches, losses, optimizers, checkpoints); rollout/ generates (engines,
buffers, producers); tasks/ is prompts and rewards; algo/ is pure math. Only orchestrator/ (and the entrypoints) wire
them together. Every ``import`` in a module counts, including the late ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "oapl_megatron"

# package → imported modules (prefixes) it must never import
FORBIDDEN = {
    "trainer": ("oapl_megatron.rollout", "oapl_megatron.orchestrator", "oapl_megatron.tasks", "vllm"),
    "rollout": ("oapl_megatron.trainer", "oapl_megatron.orchestrator", "megatron"),
    "tasks": ("oapl_megatron.trainer", "oapl_megatron.rollout", "oapl_megatron.weight_sync", "oapl_megatron.parallel",
              "oapl_megatron.orchestrator", "oapl_megatron.models", "megatron", "vllm", "torch.distributed"),
    "algo": ("oapl_megatron.trainer", "oapl_megatron.rollout", "oapl_megatron.weight_sync", "oapl_megatron.parallel",
             "oapl_megatron.orchestrator", "oapl_megatron.models", "oapl_megatron.tasks", "megatron", "vllm",
             "torch.distributed"),
    "models": ("oapl_megatron.rollout", "oapl_megatron.orchestrator", "oapl_megatron.tasks", "vllm"),
    "weight_sync": ("oapl_megatron.trainer", "oapl_megatron.orchestrator", "oapl_megatron.tasks", "megatron"),
    "config": ("oapl_megatron.trainer", "oapl_megatron.rollout", "oapl_megatron.orchestrator", "oapl_megatron.models",
               "oapl_megatron.weight_sync", "oapl_megatron.parallel", "oapl_megatron.tasks", "torch", "megatron",
               "vllm"),
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in ``path`` (relative imports resolved against the package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: -node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # `from x import submodule`
    return out


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((PKG / package).rglob("*.py")):
        for line, mod in imports_of(path):
            for prefix in FORBIDDEN[package]:
                if mod == prefix or mod.startswith(prefix + "."):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod}")
    return sorted(set(bad))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_keeps_its_walls(package):
    assert violations(package) == []


def test_only_the_orchestrator_wires_trainer_and_rollout():
    both = []
    for path in sorted(PKG.rglob("*.py")):
        pkg = path.relative_to(PKG).parts[0]
        if pkg in ("orchestrator", "entrypoints"):
            continue
        mods = [m for _, m in imports_of(path)]
        if any(m.startswith("oapl_megatron.trainer") for m in mods) and \
                any(m.startswith("oapl_megatron.rollout") for m in mods):
            both.append(str(path.relative_to(PKG.parent)))
    assert both == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The walls test must be able to fail: a trainer module importing rollout is caught, late imports too."""
    fake = tmp_path / "oapl_megatron" / "trainer"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from oapl_megatron.rollout.buffer import Group\n    from . import x\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path / "oapl_megatron")
    assert violations("trainer") == ["oapl_megatron/trainer/bad.py:2 imports oapl_megatron.rollout.buffer",
                                     "oapl_megatron/trainer/bad.py:2 imports oapl_megatron.rollout.buffer.Group"]
