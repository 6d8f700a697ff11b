"""Canonical, process-independent forms of parameter values (for cache keys and hashes)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import math
import pathlib
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = ["CacheKeyError", "canonical", "canonical_digest"]


class CacheKeyError(Exception):
    """A value has no stable canonical form (the step is then not cached)."""


def canonical(value: Any, path: str = "") -> Any:
    """A JSON-able form of `value` equal for equal values in every process.

    Raises:
        CacheKeyError: the value (at `path`) has no stable canonical form.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, enum.Enum):
        return {"__enum__": f"{type(value).__qualname__}.{value.name}"}
    if isinstance(value, list):
        return [canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, set | frozenset):
        items = [canonical(v, f"{path}{{}}") for v in value]
        return {"__set__": sorted(items, key=lambda x: json.dumps(x, sort_keys=True))}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str | int | float | bool) and k is not None:
                raise CacheKeyError(f"{path or 'value'} has a key of type {type(k).__name__}")
            out[str(k) if isinstance(k, str) else json.dumps(k)] = canonical(v, f"{path}.{k}")
        return {"__dict__": out}
    if isinstance(value, bytes | bytearray):
        return {"__bytes__": hashlib.sha256(value).hexdigest()}
    if isinstance(value, pathlib.PurePath):
        return {"__path__": str(value)}
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return {"__datetime__": value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {"__uuid__": str(value)}
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump) and hasattr(type(value), "model_fields"):
        return {"__model__": type(value).__qualname__,
                "v": canonical(model_dump(mode="python"), path)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"__dataclass__": type(value).__qualname__, "v": canonical(fields, path)}
    tobytes = getattr(value, "tobytes", None)
    if callable(tobytes) and hasattr(value, "dtype") and hasattr(value, "shape"):
        digest = hashlib.sha256(tobytes()).hexdigest()
        return {"__array__": [str(value.dtype), list(value.shape), digest]}
    if isinstance(value, type):
        return {"__type__": f"{value.__module__}.{value.__qualname__}"}
    raise CacheKeyError(
        f"parameter {path or 'value'} of type {type(value).__name__} has no stable hash"
    )


def canonical_digest(value: Any) -> str:
    """sha256 of the canonical form of `value` (raises CacheKeyError if it has none)."""
    text = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
