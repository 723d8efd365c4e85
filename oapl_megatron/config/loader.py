"""Load a config: defaults < YAML file < dotted overrides (``optim.lr=1e-6``), with errors that name the field.

    cfg = load_config(RunConfig, "configs/demo.yaml", ["optim.lr=3e-5", "parallel.tp=2"])
    write_resolved(cfg, cfg.run_dir / "config.yaml")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the field path, the value and what is allowed."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `oapl-train --help-config` lists every field)"
        value = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-6"`` → (["optim", "lr"], 1e-6). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    # YAML 1.1 reads "1e-6" as a string; accept plain floats written that way.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return parts, value


def _set_dotted(tree: dict, parts: list[str], value: Any, text: str) -> None:
    node = tree
    for i, p in enumerate(parts[:-1]):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(model: type[M], path: str | Path | None = None, overrides: Sequence[str] = ()) -> M:
    """Build ``model`` from an optional YAML file plus dotted overrides; raise :class:`ConfigError` on any problem."""
    tree: dict = load_yaml(path) if path is not None else {}
    for text in overrides:
        parts, value = parse_override(text)
        _set_dotted(tree, parts, value, text)
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_resolved(cfg: BaseModel, path: str | Path) -> Path:
    """Write the fully resolved config (every default spelled out) so a run can be reproduced from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per leaf field: dotted path, type, default and description (for ``--help-config``)."""
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            lines.extend(describe_fields(sub, f"{prefix}{name}."))
        else:
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            lines.append(f"{prefix}{name}  [{getattr(ann, '__name__', ann)}] = {default!r}  {field.description or ''}")
    return lines
