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

from flowcore.exceptions import CacheKeyError

__all__ = ["CacheKeyError", "canonical", "canonical_digest"]


def canonical(value: Any, path: str = "") -> Any:
    """A JSON-able form of `value` equal for equal values in every process.

    Raises:
        CacheKeyError: the value (at `path`) has no stable canonical form.
    """
    kind = type(value)
    # Exact types first: JSON keeps None, true, 1, 1.0 and "1" apart; subclasses (enums,
    # IntEnum, bool-like ints) get a tagged form so they never collide with plain values.
    if value is None or kind is bool or kind is int or kind is str:
        return value
    if kind is float:
        if math.isnan(value) or math.isinf(value):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, enum.Enum):
        return {"__enum__": f"{kind.__module__}.{kind.__qualname__}.{value.name}",
                "v": canonical(value.value, path)}
    if isinstance(value, bool | int | float | str):
        base = next(b for b in (bool, int, float, str) if isinstance(value, b))
        return {"__subclass__": f"{kind.__module__}.{kind.__qualname__}",
                "v": canonical(base(value), path)}
    if isinstance(value, list):
        return [canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, set | frozenset):
        items = [canonical(v, f"{path}{{}}") for v in value]
        return {"__set__": sorted(items, key=lambda x: json.dumps(x, sort_keys=True))}
    if isinstance(value, Mapping):
        # Keys keep their type ({1: x} and {"1": x} differ); pairs sorted for a stable order.
        pairs = [[canonical(k, f"{path}<key>"), canonical(v, f"{path}[{k!r}]")]
                 for k, v in value.items()]
        pairs.sort(key=lambda kv: json.dumps(kv[0], sort_keys=True))
        return {"__dict__": pairs}
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
