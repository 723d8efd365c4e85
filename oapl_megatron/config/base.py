"""Base class for every typed config: unknown keys are errors, values are validated on assignment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section. Unknown keys fail (``extra="forbid"``); every field carries a one-line description."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, protected_namespaces=())
