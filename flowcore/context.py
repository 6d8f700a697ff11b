"""The step context: what a running step body or hook may learn about its run."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flowcore._models import PipelineRun, StepRun
from flowcore.exceptions import StepContextError

if TYPE_CHECKING:
    from flowcore.stack import Stack

__all__ = ["PipelineInfo", "StepContext", "get_step_context"]


@dataclass(frozen=True, slots=True)
class PipelineInfo:
    """The pipeline a run belongs to."""

    name: str


@dataclass(slots=True)
class StepContext:
    """Information about the step invocation that is running now.

    Attributes:
        step_run: the `StepRun` (`.name`, `.config.parameters`, `.attempt`, ...).
        pipeline_run: the `PipelineRun` (`.name`, `.id`, ...).
        pipeline: the pipeline (`.name`).
        stack: the stack the run uses.
        attempt: the current attempt, counting from 1.
    """

    step_run: StepRun
    pipeline_run: PipelineRun
    pipeline: PipelineInfo
    stack: Stack
    attempt: int = 1
    output_names: tuple[str, ...] = ()

    @property
    def step_name(self) -> str:
        return self.step_run.name


_current: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "flowcore_step_context", default=None
)


def get_step_context() -> StepContext:
    """Return the context of the step whose body or hook is running.

    Raises:
        StepContextError: called outside a step body or hook.
    """
    ctx = _current.get()
    if ctx is None:
        raise StepContextError(
            "get_step_context() works only inside a step body or one of its hooks"
        )
    return ctx


def set_step_context(ctx: StepContext | None) -> contextvars.Token[StepContext | None]:
    """Make `ctx` current in this task or thread (used by the runner)."""
    return _current.set(ctx)


def reset_step_context(token: contextvars.Token[StepContext | None]) -> None:
    """Undo `set_step_context`."""
    _current.reset(token)
