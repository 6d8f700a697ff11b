"""One run from frozen plan to finished record, on the caller's event loop.

A services group (the store's writer, the heartbeat) lives around the scheduler's steps group.
However the run ends — completion, a failure, the caller's cancellation (asyncio or an anyio
cancel scope), or an error inside flowcore — its record is finished before `execute` returns
or raises: every step row terminal, every queued write committed, then the run's own row.
"""

from __future__ import annotations

import asyncio

from flowcore import _capture
from flowcore._engine._lifecycle import Lifecycle
from flowcore._engine._plan import RunPlan
from flowcore._engine._scheduler import Scheduler
from flowcore._engine._shield import finish_regardless
from flowcore._models import PipelineRun, RunStatus, StepStatus
from flowcore.exceptions import RunFailedError
from flowcore.stores._base import MetadataStore

__all__ = ["execute", "finish_regardless", "record_unstarted"]  # finish_regardless re-exported

def _final_status(run: PipelineRun) -> RunStatus:
    statuses = {sr.status for sr in run.steps.values()}
    if StepStatus.FAILED in statuses:
        return RunStatus.FAILED
    if StepStatus.STOPPED in statuses:
        return RunStatus.STOPPED
    return RunStatus.COMPLETED


def failed_invocations(run: PipelineRun) -> list[str]:
    """IDs of the failed invocations; a mapped step by its failed elements' own IDs."""
    failed = [sr.name for sr in run.steps.values() if sr.status is StepStatus.FAILED]
    elements_of = {name.rpartition("[")[0] for name in failed if name.endswith("]")}
    return [name for name in failed if name not in elements_of]


async def _serve(store: MetadataStore, run: PipelineRun, sched: Scheduler) -> None:
    # The services group: the store's writer, which commits queued status writes as they
    # happen and (SQLite) also heartbeats the process's live runs and delivers cancel
    # requests; around it the scheduler's steps group.
    async with asyncio.TaskGroup() as services:
        writer = services.create_task(store.serve_writes(), name=f"flowcore:writer:{run.name}")
        try:
            await sched.drive()
            await sched.run_deferred_hooks()
        finally:
            writer.cancel()


async def _create(store: MetadataStore, life: Lifecycle) -> None:
    """Record the run. A cancellation meanwhile lets the write finish and records the run
    STOPPED, so the store never keeps a RUNNING run nobody runs."""
    created = False

    async def create() -> None:
        nonlocal created
        await store.create_run(life.run)
        created = True

    try:
        await finish_regardless(create())
    except asyncio.CancelledError:
        if created:
            await finish_regardless(life.run_finished(RunStatus.STOPPED))
        raise


async def record_unstarted(plan: RunPlan) -> None:
    """A background run cancelled before its task first ran: STOPPED, its steps SKIPPED, in
    the handle's record and (where the store takes it) in the store."""
    store = await plan.stack.metadata_store()
    life = Lifecycle(plan.run, store)
    try:
        await store.create_run(plan.run)
    finally:
        await life.run_finished(RunStatus.STOPPED)


def _run_failed(run: PipelineRun, deadline: BaseException | None,
                first: BaseException | None) -> RunFailedError:
    what = []
    if deadline is not None:
        what.append(str(deadline))
    failed = failed_invocations(run)
    if failed:
        what.append(f"step(s) {', '.join(repr(f) for f in failed)} failed")
    if first is not None and deadline is None:
        what.append(f"first error: {first!r}")
    error = RunFailedError(
        f"run '{run.name}' of pipeline '{run.pipeline_name}' failed: {'; '.join(what)}", run=run)
    error.__cause__ = deadline or first
    return error


async def execute(plan: RunPlan, *, raise_on_failure: bool = True) -> PipelineRun:
    """Record and run a planned run on the caller's loop.

    Raises:
        RunNameConflictError: before any step runs.
        RunFailedError: a step failed (`.run` is the run, `__cause__` the first error).
        asyncio.CancelledError: the run was cancelled (it is recorded as STOPPED first).
    """
    run = plan.run
    plan.started = True
    store = await plan.stack.metadata_store()
    life = Lifecycle(run, store)
    await _create(store, life)
    life.run_started()
    sched = Scheduler(plan, life, store)
    live = plan.stack.live_runs.add(run.id, sched.request_stop)
    # Cancel requests from other processes reach the run through its store (API.md §15).
    store.watch_cancels(run.id, sched.request_stop)
    deadline = None
    if plan.timeout is not None:
        # Measured from the run's start: a timer, not a task (cancelled in the finally below).
        deadline = asyncio.get_running_loop().call_later(plan.timeout, sched.deadline_passed)
    status: RunStatus | None = None
    if plan.capture_logs:
        _capture.install()
    try:
        await _serve(store, run, sched)
    except asyncio.CancelledError:
        status = RunStatus.STOPPED
        raise
    except BaseExceptionGroup as group:  # flowcore itself failed (e.g. the store's writer)
        status = RunStatus.FAILED
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    except BaseException:
        status = RunStatus.FAILED
        raise
    finally:
        if deadline is not None:
            deadline.cancel()
        if plan.capture_logs:
            _capture.uninstall()
        plan.first_error = sched.first_error
        plan.values = sched.values
        if status is None:
            status = _final_status(run)
            if sched.deadline_error is not None:
                status = RunStatus.FAILED
            elif sched.stop_requested and status is RunStatus.COMPLETED:
                status = RunStatus.STOPPED  # drained: what ran finished, the rest never began
        store.unwatch_cancels(run.id)
        try:
            await finish_regardless(life.run_finished(status))
        finally:
            plan.stack.live_runs.finish(live)
            sched.close()
    if run.status is RunStatus.FAILED and raise_on_failure:
        raise _run_failed(run, sched.deadline_error, sched.first_error)
    return run
