"""`RunHandle`: a run going on in the background (from `submit()` or a non-synchronous call)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from flowcore._engine._plan import RunPlan
from flowcore._engine._run import execute, finish_regardless, record_unstarted
from flowcore._models import PipelineRun, RunStatus
from flowcore.exceptions import FlowcoreError, RunFailedError

__all__ = ["RunHandle", "execute_owned"]


async def execute_owned(plan: RunPlan) -> PipelineRun:
    """`execute` for a run a RunHandle owns: the handle's cancel() stops the run, which then
    ends STOPPED and is returned instead of the cancellation."""
    try:
        return await execute(plan)
    except asyncio.CancelledError:
        if plan.run.status is RunStatus.STOPPED:
            return plan.run
        raise


class RunHandle:
    """A run going on in the background.

    `await handle` (or `await handle.wait()`) returns the `PipelineRun`; `await handle.cancel()`
    stops it (the run ends STOPPED). From synchronous code, `.result(timeout)` blocks.
    """

    def __init__(
        self,
        plan: RunPlan,
        *,
        task: asyncio.Task[PipelineRun] | None = None,
        future: concurrent.futures.Future[PipelineRun] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        thread_task: asyncio.Task[Any] | None = None,
    ) -> None:
        self._plan = plan
        self._task = task
        self._future = future
        self._loop = loop
        self._thread_task = thread_task

    @property
    def run_name(self) -> str:
        return self._plan.run.name

    @property
    def run_id(self) -> str:
        return self._plan.run.id

    @property
    def run(self) -> PipelineRun:
        """The live run record (its status and steps change while it runs)."""
        return self._plan.run

    @property
    def status(self) -> RunStatus:
        return self._plan.run.status

    def done(self) -> bool:
        if self._task is not None:
            return self._task.done()
        assert self._future is not None
        return self._future.done()

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
                    await self._settle_unstarted()
                    return self._plan.run
                raise
        assert self._future is not None
        return await asyncio.wrap_future(self._future)

    async def _settle_unstarted(self) -> None:
        if self._plan.started:
            return
        self._plan.started = True  # recorded once, by whoever notices first
        await finish_regardless(record_unstarted(self._plan))

    async def cancel(self) -> PipelineRun:
        """Stop the run now; returns it once every step task has ended (status STOPPED)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
            await self._settle_unstarted()
            return self._plan.run
        assert self._loop is not None and self._future is not None
        if self._thread_task is not None:
            try:
                self._loop.call_soon_threadsafe(self._thread_task.cancel)
            except RuntimeError:  # its loop has already closed: the run has ended
                pass
        try:
            await asyncio.wrap_future(self._future)
        except (asyncio.CancelledError, RunFailedError):
            pass
        return self._plan.run

    def result(self, timeout: float | None = None) -> PipelineRun:
        """Block until the run ends (synchronous code only) and return it."""
        if self._future is None:
            raise FlowcoreError(
                f"run '{self.run_name}' runs on an event loop; use `await handle` instead"
            )
        try:
            return self._future.result(timeout)
        except concurrent.futures.CancelledError:
            return self._plan.run


def _current_task_not_cancelling() -> bool:
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0
