"""`RunHandle`: a run going on in the background (from `submit()` or a non-synchronous call)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Protocol

from flowcore import events
from flowcore._engine._lifecycle import end_unrecorded
from flowcore._engine._plan import RunPlan
from flowcore._engine._run import execute, finish_regardless, record_unstarted
from flowcore._models import PipelineRun, RunStatus
from flowcore.exceptions import FlowcoreError, RunFailedError


class PendingStart(Protocol):
    """A submitted run whose plan is not made yet (`_submit.PendingStart`)."""

    plan: RunPlan | None

    def request_stop(self, drain: bool = False) -> None: ...

    async def record_stopped(self) -> None: ...

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
        plan: RunPlan | None = None,
        *,
        run: PipelineRun | None = None,
        pending: PendingStart | None = None,
        task: asyncio.Task[PipelineRun] | None = None,
        future: concurrent.futures.Future[PipelineRun] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        thread_task: asyncio.Task[Any] | None = None,
    ) -> None:
        # A submitted run's handle exists before its plan (see _submit): `run` is its record,
        # `pending` reaches it until the plan is made.
        self._plan = plan
        record = plan.run if plan is not None else run
        assert record is not None
        self._run = record
        self._pending = pending
        self._task = task
        self._future = future
        self._loop = loop
        self._thread_task = thread_task

    def attach(self, task: asyncio.Task[PipelineRun]) -> None:
        self._task = task

    def _made_plan(self) -> RunPlan | None:
        """The run's plan, if it is made (a submitted run's comes after its handle)."""
        if self._plan is None and self._pending is not None:
            self._plan = self._pending.plan
        return self._plan

    @property
    def run_name(self) -> str:
        return self._run.name

    @property
    def run_id(self) -> str:
        return self._run.id

    @property
    def run(self) -> PipelineRun:
        """The live run record (its status and steps change while it runs)."""
        return self._run

    @property
    def status(self) -> RunStatus:
        return self._run.status

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
                    return self._run
                raise
        assert self._future is not None
        return await asyncio.wrap_future(self._future)

    async def _settle_unstarted(self) -> None:
        plan = self._made_plan()
        if plan is None:
            if self._pending is not None:  # a submitted run cancelled before its plan
                await self._pending.record_stopped()
            end_unrecorded(self._run, RunStatus.STOPPED)  # no plan: ends in the handle only
            return
        if plan.started:
            return
        plan.started = True  # recorded once, by whoever notices first
        await finish_regardless(record_unstarted(plan))

    async def cancel(self) -> PipelineRun:
        """Stop the run now; returns it once every step task has ended (status STOPPED)."""
        if self._task is not None:
            if self._made_plan() is None and self._pending is not None:
                self._pending.request_stop()  # no plan yet: it is made, and recorded STOPPED
            else:
                self._task.cancel()
            await asyncio.wait({self._task})
            await self._settle_unstarted()
            return self._run
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
        return self._run

    async def events(self) -> AsyncIterator[events.Event]:
        """The run's events, from the first (those that already happened are rebuilt from its
        record and come first) to `RunFinished`, after which the iteration ends."""
        run = self._run
        loop = asyncio.get_running_loop()
        thread = threading.get_ident()
        queue: asyncio.Queue[events.Event] = asyncio.Queue()

        def on_event(event: events.Event) -> None:
            if event.run_id != run.id:
                return
            if threading.get_ident() == thread:
                queue.put_nowait(event)
            else:  # a run on a thread of its own: hand the event over to our loop
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                except RuntimeError:
                    pass

        # Snapshot and subscription with no await between them: nothing is missed, and what
        # the snapshot already told is not told twice (see `seen`).
        plan = self._made_plan()
        if plan is None and run.status.is_finished:  # ended before it had a plan
            past: list[events.Event] = [events.RunFinished(
                run.id, run.name, run.status.value, run.end_time or run.start_time)]
        else:
            past = _events_so_far(run, plan is not None and plan.started)
        unsubscribe = events.subscribe(on_event)
        seen = {_identity(e) for e in past}
        try:
            for event in past:
                yield event
                if isinstance(event, events.RunFinished):
                    return
            while True:
                event = await queue.get()
                key = _identity(event)
                if key in seen:
                    continue
                seen.add(key)
                yield event
                if isinstance(event, events.RunFinished):
                    return
        finally:
            unsubscribe()

    def result(self, timeout: float | None = None) -> PipelineRun:
        """Block until the run ends (synchronous code only) and return it."""
        if self._future is None:
            raise FlowcoreError(
                f"run '{self.run_name}' runs on an event loop; use `await handle` instead"
            )
        try:
            return self._future.result(timeout)
        except concurrent.futures.CancelledError:
            return self._run


def _identity(event: events.Event) -> tuple[object, ...]:
    if isinstance(event, events.StepStarted | events.StepRetrying):
        return (type(event), event.step, event.attempt)
    if isinstance(event, events.StepFinished):
        return (type(event), event.step)
    return (type(event),)


def _events_so_far(run: PipelineRun, began: bool) -> list[events.Event]:
    """The events a run has had until now, rebuilt from its record, in time order."""
    if not began and not run.status.is_finished:
        return []
    out: list[events.Event] = [events.RunStarted(run.id, run.name, run.pipeline_name,
                                                 tuple(run.steps), run.start_time)]
    timed: list[tuple[datetime, int, events.Event]] = []
    for sr in list(run.steps.values()):
        if sr.start_time is not None and sr.attempts:
            timed.append((sr.start_time, 0, events.StepStarted(run.id, sr.name, sr.attempts,
                                                               sr.start_time, sr.waited)))
        if sr.status.is_finished and sr.end_time is not None:
            timed.append((sr.end_time, 1, events.StepFinished(
                run.id, sr.name, sr.status.value, sr.attempts,
                str(sr.error) if sr.error else None, sr.end_time, sr.waited)))
    timed.sort(key=lambda t: (t[0], t[1]))
    out.extend(e for _, _, e in timed)
    if run.status.is_finished:
        out.append(events.RunFinished(run.id, run.name, run.status.value,
                                      run.end_time or run.start_time))
    return out


def _current_task_not_cancelling() -> bool:
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0
