"""Background runs: the handle returned by `submit()` and by non-synchronous calls."""

from __future__ import annotations

import asyncio
from typing import Any

from flowcore._models import (
    PipelineRun,
    RunStatus,
)
from flowcore._prepare import PreparedRun
from flowcore._runner import execute_in_background, mark_unstarted_stopped
from flowcore.exceptions import (
    FlowcoreError,
    RunFailedError,
)

__all__ = ["RunHandle", "start_background"]

class RunHandle:
    """A run going on in the background.

    `await handle` (or `await handle.wait()`) returns the `PipelineRun`; `await handle.cancel()`
    stops it (the run ends STOPPED). From synchronous code, `.result(timeout)` blocks.
    """

    def __init__(
        self,
        prep: PreparedRun,
        *,
        task: asyncio.Task[PipelineRun] | None = None,
        future: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._prep = prep
        self._task = task
        self._future = future
        self._loop = loop

    @property
    def run_name(self) -> str:
        return self._prep.run.name

    @property
    def run_id(self) -> str:
        return self._prep.run.id

    @property
    def run(self) -> PipelineRun:
        """The live run record (its status and steps change while it runs)."""
        return self._prep.run

    @property
    def status(self) -> RunStatus:
        return self._prep.run.status

    def done(self) -> bool:
        if self._task is not None:
            return self._task.done()
        return bool(self._future.done())

    def __repr__(self) -> str:
        return f"<RunHandle {self.run_name} {self.status.value.upper()}>"

    def __await__(self) -> Any:
        return self.wait().__await__()

    async def wait(self) -> PipelineRun:
        """Wait for the run to end and return it (raises RunFailedError if a step failed)."""
        if self._task is not None:
            # Shield: cancelling the waiter must not cancel the run; use cancel() for that.
            try:
                return await asyncio.shield(self._task)
            except asyncio.CancelledError:
                if self._task.cancelled() and _current_task_not_cancelling():
                    return self._stopped_before_start()
                raise
        return await asyncio.wrap_future(self._future)

    def _stopped_before_start(self) -> PipelineRun:
        # A run cancelled before its task first ran never started: nothing ran, nothing stored.
        return mark_unstarted_stopped(self._prep.run)

    async def cancel(self) -> PipelineRun:
        """Stop the run now; returns it once every step task has ended (status STOPPED)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            return self._stopped_before_start()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._cancel_in_loop)
        try:
            await asyncio.wrap_future(self._future)
        except (asyncio.CancelledError, RunFailedError):
            pass
        return self._prep.run

    def _cancel_in_loop(self) -> None:
        for task in asyncio.all_tasks(self._loop):
            if task.get_name() == f"flowcore:run:{self.run_name}":
                task.cancel()

    def result(self, timeout: float | None = None) -> PipelineRun:
        """Block until the run ends (synchronous code only) and return it."""
        if self._future is None:
            raise FlowcoreError(
                f"run '{self.run_name}' runs on an event loop; use `await handle` instead"
            )
        import concurrent.futures

        try:
            result: PipelineRun = self._future.result(timeout)
        except concurrent.futures.CancelledError:
            return self._prep.run
        return result


def _current_task_not_cancelling() -> bool:
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0


def start_background(prep: PreparedRun) -> RunHandle:
    """Start a prepared run as a background task on the running loop."""

    task = asyncio.get_running_loop().create_task(
        execute_in_background(prep), name=f"flowcore:run:{prep.run.name}")
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return RunHandle(prep, task=task)


# Strong references to background runs (the loop keeps only weak ones); each is owned by the
# RunHandle returned to the caller, who awaits or cancels it.
_BACKGROUND: set[asyncio.Task[PipelineRun]] = set()

