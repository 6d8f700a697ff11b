"""Run and step events as frozen records, and subscribing to them.

`flowcore.events.subscribe(callback)` receives every event of every run in this process;
`handle.events()` iterates over one run's. Each event has the `run_id` and a timezone-aware
`timestamp` (also `at`). The engine emits events only while someone listens: with no listener,
a transition costs one truthiness check.
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
    "subscribe",
]


class _Timestamped:
    __slots__ = ()
    at: datetime

    @property
    def timestamp(self) -> datetime:
        """When it happened (UTC)."""
        return self.at


@dataclass(frozen=True, slots=True)
class RunStarted(_Timestamped):
    """A run began (its record exists; no step has started yet)."""

    run_id: str
    run_name: str
    pipeline_name: str
    step_names: tuple[str, ...]
    at: datetime


@dataclass(frozen=True, slots=True)
class StepStarted(_Timestamped):
    """An attempt of a step began."""

    run_id: str
    step: str
    attempt: int
    at: datetime
    waited: float = 0.0  # seconds this step has waited for a pool slot so far


@dataclass(frozen=True, slots=True)
class StepRetrying(_Timestamped):
    """An attempt failed and the step will be tried again after `delay` seconds."""

    run_id: str
    step: str
    attempt: int
    delay: float
    error: str
    at: datetime


@dataclass(frozen=True, slots=True)
class StepFinished(_Timestamped):
    """A step ended: `status` is the StepStatus value (completed, cached, failed, ...)."""

    run_id: str
    step: str
    status: str
    attempts: int
    error: str | None
    at: datetime
    waited: float = 0.0  # seconds the step waited for pool slots


@dataclass(frozen=True, slots=True)
class RunFinished(_Timestamped):
    """A run ended: `status` is the RunStatus value; its record is final."""

    run_id: str
    run_name: str
    status: str
    at: datetime


Event = RunStarted | StepStarted | StepRetrying | StepFinished | RunFinished
Listener = Callable[[Event], None]

# Read by the engine on every transition; kept a plain list so "no listener" is one check.
listeners: list[Listener] = []


def add_listener(listener: Listener) -> None:
    """Receive every event of every run in this process (called on the run's event loop;
    keep it quick and never raise)."""
    listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    """Stop receiving events."""
    try:
        listeners.remove(listener)
    except ValueError:
        pass


def subscribe(callback: Listener) -> Callable[[], None]:
    """Call `callback(event)` for every event of every run in this process, from the run's
    own event loop, until the returned function is called. A callback that raises is logged
    and never breaks a run.
    """
    add_listener(callback)
    return lambda: remove_listener(callback)
