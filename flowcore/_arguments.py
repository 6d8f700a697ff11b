"""Step-call arguments as graph references: output handles become `OutputRef`s, and a handle
hidden where the engine would never replace it is refused while the pipeline compiles."""

from __future__ import annotations

import dataclasses
import itertools
import types
from collections.abc import Iterable
from typing import Any

from flowcore._graph import OutputRef
from flowcore._step import OutputHandle, Step
from flowcore.exceptions import PipelineDefinitionError

__all__ = ["ArgumentPlace", "Where", "to_refs"]


def to_refs(value: Any, where: Any) -> Any:
    """Replace output handles (also inside lists, tuples and dicts) by OutputRefs.

    Raises:
        PipelineDefinitionError: a handle hides anywhere else (a set, a dataclass, an object),
            where the runner would never replace it.
    """
    if isinstance(value, OutputHandle):
        if value.output_name is None:
            raise PipelineDefinitionError(
                f"{where}: step invocation '{value.invocation_id}' has no outputs, so it cannot "
                "be passed as data; use after=[...] for an order-only dependency"
            )
        return OutputRef(value.invocation_id, value.output_name)
    kind = type(value)
    if kind in _LEAVES:
        return value
    if isinstance(value, list):
        return [to_refs(v, where) for v in value]
    if isinstance(value, tuple):
        return tuple(to_refs(v, where) for v in value)
    if isinstance(value, dict):
        for k in value:
            _refuse_hidden(k, where, "a dict key")
        return {k: to_refs(v, where) for k, v in value.items()}
    _refuse_hidden(value, where, f"a {kind.__name__}")
    return value


# Types that cannot hold a handle: the common parameter values skip the search at once.
_LEAVES = frozenset({str, int, float, bool, bytes, type(None), complex, range})
# How deep the search looks inside objects: deep enough for a config object holding a
# dataclass holding a handle, shallow enough to stay cheap for a big user object.
_MAX_DEPTH = 4


def _refuse_hidden(value: Any, where: Any, container: str) -> None:
    if _holds_handle(value, 0, set()):
        raise PipelineDefinitionError(
            f"{where}: an output handle inside {container} cannot be passed to a step; only "
            "lists, tuples and dicts of handles fan in (pass a list instead)"
        )


def _holds_handle(value: Any, depth: int, seen: set[int]) -> bool:
    """Whether an output handle is anywhere in `value`, searched to `_MAX_DEPTH` levels."""
    if isinstance(value, OutputHandle):
        return True
    kind = type(value)
    if kind in _LEAVES or depth > _MAX_DEPTH or id(value) in seen:
        return False
    if isinstance(value, type | types.ModuleType | types.FunctionType | types.BuiltinFunctionType
                  | types.MethodType | Step):
        return False
    seen.add(id(value))
    children: Iterable[Any]
    if isinstance(value, list | tuple | set | frozenset):
        children = value
    elif isinstance(value, dict):
        children = itertools.chain(value, value.values())
    elif dataclasses.is_dataclass(value):
        children = (getattr(value, f.name, None) for f in dataclasses.fields(value))
    else:
        attrs = getattr(value, "__dict__", None)
        children = list(attrs.values()) if isinstance(attrs, dict) else []
        for cls in kind.__mro__:
            for slot in cls.__dict__.get("__slots__", ()):
                if isinstance(slot, str) and slot not in ("__dict__", "__weakref__"):
                    children.append(getattr(value, slot, None))
    return any(_holds_handle(child, depth + 1, seen) for child in children)


class ArgumentPlace:
    """Formats "<where>, argument 'k'" only when an error message needs it."""

    __slots__ = ("key", "where")

    def __init__(self, where: Any, key: str) -> None:
        self.where = where
        self.key = key

    def __str__(self) -> str:
        return f"{self.where}, argument '{self.key}'"

    __format__ = lambda self, spec: str(self)  # noqa: E731


class Where:
    """Formats "pipeline 'p', step 's'" only when an error message needs it."""

    __slots__ = ("pipeline", "step")

    def __init__(self, pipeline: str, step: str) -> None:
        self.pipeline = pipeline
        self.step = step

    def __str__(self) -> str:
        return f"pipeline '{self.pipeline}', step '{self.step}'"

    __format__ = lambda self, spec: str(self)  # noqa: E731
