"""How a stage declares its typed configuration: plain dataclasses whose fields carry a description
and their valid range. The loader in ``accllm.config`` reads these declarations to validate YAML,
dump defaults and suggest the nearest key; stages never import it.

A dataclass may define ``problems(self) -> list[tuple[str, str]]`` for checks across fields; each
problem is (key relative to the dataclass, message).

``param(..., omit_default=True)`` marks a field added after artifacts were made with its dataclass: an
artifact's ``recipe.yaml`` lists it only when it differs from the default, so recipes that do not use it keep
the bytes they had.
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def param(default: Any = MISSING, doc: str = "", *, min=None, max=None, choices=None,
          default_factory: Any = MISSING, omit_default: bool = False):
    meta = {"doc": doc, "min": min, "max": max, "choices": tuple(choices) if choices else None,
            "omit_default": omit_default}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)
