"""Dataclasses and pydantic models <-> JSON-ready values, one place for enums, paths and tuples."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def as_json(obj: object) -> Any:
    """`obj` as plain JSON values (dicts, lists, str, numbers, bool, None)."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [as_json(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): as_json(v) for k, v in obj.items()}
    return obj
