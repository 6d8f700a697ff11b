"""Hook binding (once, at compile time) and calling (per step, off the hot path when absent)."""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowcore._models import StepStatus
from flowcore._signature import resolve_annotations_checked
from flowcore._threads import run_in_worker_thread
from flowcore.exceptions import PipelineDefinitionError

__all__ = ["HOOK_KINDS", "BoundHook", "bind_hook"]

HOOK_KINDS = ("on_start", "on_success", "on_failure", "on_end")
_INJECTABLE = ("exception", "step_name", "step_output", "status")
_BOUND: dict[tuple[int, str], BoundHook] = {}
_BOUND_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class BoundHook:
    """A hook and the arguments it asked for, each one of `exception`, `step_name`,
    `step_output` or `status`."""

    func: Callable[..., Any]
    kind: str
    wants: tuple[tuple[str, str], ...]
    is_async: bool

    @property
    def label(self) -> str:
        return getattr(self.func, "__qualname__", repr(self.func))

    async def call(
        self,
        *,
        exception: BaseException | None = None,
        step_name: str = "",
        step_output: Any = None,
        status: StepStatus | None = None,
    ) -> None:
        available = {
            "exception": exception,
            "step_name": step_name,
            "step_output": step_output,
            "status": status,
        }
        kwargs = {param: available[what] for param, what in self.wants}
        if self.is_async:
            await self.func(**kwargs)
        else:
            # A sync hook may block (an HTTP post); it runs in a worker thread that sees the
            # step context, like a sync step body.
            await run_in_worker_thread(self.func, **kwargs)


def _resolve(hook: Any, where: str) -> Callable[..., Any]:
    if isinstance(hook, str):
        module, _, attr = hook.rpartition(".")
        try:
            return typing.cast(Callable[..., Any], getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError, ValueError) as exc:
            raise PipelineDefinitionError(f"{where}: cannot import hook '{hook}': {exc}") from exc
    if not callable(hook):
        raise PipelineDefinitionError(f"{where}: hook {hook!r} is not callable")
    return typing.cast(Callable[..., Any], hook)


def _is_exception_annotation(ann: Any) -> bool:
    """`BaseException` or a subclass, also inside `X | None` / `Optional[X]`."""
    if isinstance(ann, type):
        return issubclass(ann, BaseException)
    args = typing.get_args(ann)
    if args and (typing.get_origin(ann) in (typing.Union, types.UnionType)):
        return any(isinstance(a, type) and issubclass(a, BaseException) for a in args)
    return False


def bind_hook(hook: Any, kind: str, where: str) -> BoundHook:
    """Inspect a hook once and decide what each of its parameters receives.

    Args:
        hook: a sync or async callable, or an import path to one.
        kind: one of HOOK_KINDS.
        where: names the pipeline and step in errors.

    Raises:
        PipelineDefinitionError: the hook asks for something flowcore cannot give it.
    """
    func = _resolve(hook, where)
    # Bound once per (hook, kind) for the process: inspecting a signature and its annotations
    # costs more than the rest of a small run's plan. The entry holds the function, so its id
    # is not reused while it lives; a hook whose annotations did not all resolve yet (a class
    # defined later) is inspected again next time. Errors are raised, never kept.
    key = (id(func), kind)
    known = _BOUND.get(key)
    if known is not None and known.func is func:
        return known
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise PipelineDefinitionError(f"{where}: cannot inspect {kind} hook {func!r}") from exc
    hints, complete = resolve_annotations_checked(func)
    wants: list[tuple[str, str]] = []
    for name, param in sig.parameters.items():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        ann = hints.get(name)
        if _is_exception_annotation(ann):
            wants.append((name, "exception"))
        elif name in _INJECTABLE:
            wants.append((name, name))
        elif param.default is not inspect.Parameter.empty:
            continue
        else:
            label = getattr(func, "__qualname__", repr(func))
            raise PipelineDefinitionError(
                f"{where}: {kind} hook '{label}' asks for parameter '{name}', which flowcore "
                f"cannot provide; a hook may take {', '.join(_INJECTABLE)} "
                "(or one parameter annotated with an exception type), or nothing"
            )
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise PipelineDefinitionError(
                f"{where}: {kind} hook parameter '{name}' must not be positional-only"
            )
    is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - async callable objects count too
    )
    bound = BoundHook(func=func, kind=kind, wants=tuple(wants), is_async=is_async)
    if complete:
        if len(_BOUND) >= _BOUND_LIMIT:
            _BOUND.clear()
        _BOUND[key] = bound
    return bound
