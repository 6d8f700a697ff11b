"""Structured events through the stdlib logger `flowcore`; the library never configures logging.

Every event is a snake_case name with key=value fields (run, step, attempt, ...). Callers check
`enabled()` first, so a filtered-out level costs one cached stdlib lookup and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["bind_step", "enabled", "log", "stdlib_logger"]

stdlib_logger = logging.getLogger("flowcore")
# The stdlib's advice for libraries: without a handler of the host's, events go nowhere
# (never to stderr through logging.lastResort).
stdlib_logger.addHandler(logging.NullHandler())


def _render(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # Hand the stdlib logger a readable one-line message and the raw fields (as `extra`), so
    # both plain handlers and structured ones (JSON formatters) get what they need.
    event = event_dict.pop("event", "")
    fields = " ".join(f"{k}={v}" for k, v in event_dict.items())
    msg = f"{event} {fields}" if fields else str(event)
    return (msg,), {"extra": {"flowcore_event": event, "flowcore": dict(event_dict)}}


_logger = structlog.wrap_logger(
    stdlib_logger,
    processors=[structlog.contextvars.merge_contextvars, _render],
    wrapper_class=structlog.stdlib.BoundLogger,
    cache_logger_on_first_use=True,
)


def enabled(level: int = logging.INFO) -> bool:
    """Whether an event at `level` would be handled (cheap: the stdlib caches the answer)."""
    return stdlib_logger.isEnabledFor(level)


def log(level: int, event: str, **fields: Any) -> None:
    """Emit one structured event (callers check `enabled(level)` first on hot paths)."""
    if stdlib_logger.isEnabledFor(level):
        _logger.log(level, event, **fields)


def bind_step(run: str, step: str, attempt: int) -> None:
    """Bind run, step and attempt to the current task's (or thread's) structlog context, so
    the host application's own structlog events from a step body carry them too."""
    structlog.contextvars.bind_contextvars(run=run, step=step, attempt=attempt)


def enable_console_logging(level: int = logging.INFO) -> None:
    """Turn on readable console output for examples and the CLI (never called by the library)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    stdlib_logger.addHandler(handler)
    stdlib_logger.setLevel(level)
