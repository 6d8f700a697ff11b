"""Run and step events as frozen records, and the listeners that receive them.

The runner emits an event for every transition when at least one listener is registered
(progress displays, the CLI); with none, emitting costs one truthiness check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "Event",
    "RunFinished",
    "RunStarted",
    "StepFinished",
    "StepRetrying",
    "StepStarted",
    "add_listener",
    "listeners",
    "remove_listener",
]


@dataclass(frozen=True, slots=True)
class RunStarted:
    run_id: str
    run_name: str
    pipeline_name: str
    step_names: tuple[str, ...]
    at: datetime


@dataclass(frozen=True, slots=True)
class StepStarted:
    run_id: str
    step: str
    attempt: int
    at: datetime


@dataclass(frozen=True, slots=True)
class StepRetrying:
    run_id: str
    step: str
    attempt: int
    delay: float
    error: str
    at: datetime


@dataclass(frozen=True, slots=True)
class StepFinished:
    """A step ended: `status` is the StepStatus value (completed, cached, failed, ...)."""

    run_id: str
    step: str
    status: str
    attempts: int
    error: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class RunFinished:
    run_id: str
    run_name: str
    status: str
    at: datetime


Event = RunStarted | StepStarted | StepRetrying | StepFinished | RunFinished
Listener = Callable[[Event], None]

# Read by the runner on every transition; kept a plain list so "no listener" is one check.
listeners: list[Listener] = []


def add_listener(listener: Listener) -> None:
    """Receive every event of every run in this process (called on the event loop; keep it
    quick and never raise)."""
    listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    """Stop receiving events."""
    try:
        listeners.remove(listener)
    except ValueError:
        pass
