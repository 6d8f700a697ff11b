"""Step operators: where a step body runs. The default runs async bodies on the loop and sync
bodies in a worker thread."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = ["LocalStepOperator", "StepOperator", "StepOperatorSettings"]


class StepOperatorSettings(BaseModel):
    """Settings a step may pass to its step operator (`settings={"step_operator": {...}}`)."""

    model_config = ConfigDict(extra="forbid")


class StepOperator:
    """Base class: runs one attempt of a step body somewhere and returns its result."""

    flavor: ClassVar[str] = "local"
    SETTINGS: ClassVar[type[BaseModel]] = StepOperatorSettings

    async def start(self) -> None:
        """Acquire resources (pools, clusters) before the first step; safe to call twice."""

    async def stop(self) -> None:
        """Release resources."""

    async def run(
        self,
        func: Callable[..., Any],
        kwargs: dict[str, Any],
        *,
        is_async: bool,
        settings: BaseModel | None = None,
    ) -> Any:
        """Run one attempt; cancellation of the awaiting task must stop remote work too."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class LocalStepOperator(StepOperator):
    """Async bodies on the caller's loop; sync bodies in a worker thread that sees the step
    context."""

    async def run(
        self,
        func: Callable[..., Any],
        kwargs: dict[str, Any],
        *,
        is_async: bool,
        settings: BaseModel | None = None,
    ) -> Any:
        if is_async:
            return await func(**kwargs)
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(None, functools.partial(ctx.run, func, **kwargs))
