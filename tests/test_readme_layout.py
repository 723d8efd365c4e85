"""The README's module map matches the code: every module of the package is named there, and every module it names
exists (so the map cannot silently go stale when a module is added, moved or removed)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def test_every_module_is_in_the_readme_map_and_every_named_module_exists():
    block = _layout_block()
    named = set(re.findall(r"\b([a-z_]+)\.py\b", block)) | set(re.findall(r"\b([a-z_]+)/(?=[\s(,]|$)", block))
    modules = {p.stem for p in (ROOT / "oapl_megatron").rglob("*.py") if p.stem != "__init__"}
    packages = {p.name for p in (ROOT / "oapl_megatron").rglob("*") if p.is_dir() and (p / "__init__.py").exists()}
    assert sorted(modules - named) == [], "modules missing from the README's Layout section"
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    unknown = {n for n in named if n not in modules | packages | top and not (ROOT / "tools" / f"{n}.py").exists()}
    unknown -= {"oapl_megatron", "templates", "sandbox", "checkpoint"}  # folders named inside the tree
    assert sorted(unknown) == [], "the README names modules that do not exist"
