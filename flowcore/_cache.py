"""Cache keys: a sha256 over what determines a step's outputs.

The key covers the step's normalized source (decorators stripped), its parameters in canonical
form, the content hashes of its input artifacts, its output materializers and the settings that
can change its outputs. A parameter that cannot be put in canonical form makes the step
uncacheable (never a false hit).
"""

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

from flowcore._graph import Node

__all__ = ["CACHE_KEY_VERSION", "CacheKeyError", "canonical", "compute_cache_key"]

CACHE_KEY_VERSION = "1"

# Settings keys that choose where or how a step runs, not what it computes.
_NON_OUTPUT_SETTINGS = frozenset({"orchestrator", "step_operator", "experiment_tracker",
                                  "docker", "resources"})


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


_static_parts: dict[int, tuple[Node, str]] = {}


def _static_digest(node: Node, materializers: Mapping[str, type[Any]]) -> str:
    entry = _static_parts.get(id(node))
    if entry is not None and entry[0] is node:
        return entry[1]
    cfg = node.config
    settings = {k: v for k, v in cfg.settings.items()
                if k.split(".", 1)[0] not in _NON_OUTPUT_SETTINGS}
    payload = {
        "v": CACHE_KEY_VERSION,
        "source": node.step.signature.source,
        "outputs": list(node.step.signature.output_names),
        "parameters": canonical(dict(cfg.parameters), "parameters"),
        "materializers": {k: f"{m.__module__}.{m.__qualname__}"
                          for k, m in sorted(materializers.items())},
        "settings": canonical(settings, "settings"),
        "map": None if node.map_spec is None else [list(node.map_spec.mapped),
                                                   node.map_spec.product],
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    if len(_static_parts) > 100_000:
        _static_parts.clear()
    _static_parts[id(node)] = (node, digest)
    return digest


def compute_cache_key(
    node: Node,
    input_hashes: Mapping[str, Any],
    materializers: Mapping[str, type[Any]],
    extra: Any = None,
) -> str:
    """The cache key of one invocation given the content hashes of its inputs.

    Raises:
        CacheKeyError: a parameter has no stable canonical form.
    """
    static = _static_digest(node, materializers)
    if not input_hashes and extra is None:
        return static
    payload = json.dumps(
        {"static": static, "inputs": input_hashes, "extra": canonical(extra, "element")},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()
