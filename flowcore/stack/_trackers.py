"""Experiment trackers: a context that is active while a step body runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = ["ExperimentTracker", "ExperimentTrackerSettings"]


class ExperimentTrackerSettings(BaseModel):
    """Settings a step may pass to its tracker (`settings={"experiment_tracker": {...}}`)."""

    model_config = ConfigDict(extra="allow")


class ExperimentTracker:
    """Base class: `track()` is entered around every attempt of a step body."""

    flavor: ClassVar[str] = "base"
    SETTINGS: ClassVar[type[BaseModel]] = ExperimentTrackerSettings

    @contextlib.contextmanager
    def track(
        self, *, pipeline_name: str, run_name: str, step_name: str, settings: Any = None
    ) -> Iterator[None]:
        """Context active while the step body runs."""
        yield

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"
