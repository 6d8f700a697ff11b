"""`p.submit(...)`: a background run whose handle exists at once and whose plan comes later.

A service may call `submit()` hundreds of times in one go (a burst of requests). Compiling
and planning a run costs a few hundred microseconds of the loop; done inside `submit()`, a
burst of 500 would hold the loop for a good part of a second (API.md §17 asks for a lag under
50 ms). So `submit()` only checks what is cheap to check (the stack, the run options, the
parameters against the pipeline function's signature), names the run and returns its handle;
the run's own task compiles and plans it, passing through a `StartGate` that lets only a few
runs of a burst plan in any one turn of the loop, so the loop keeps serving everything else
between them. Everything that is wrong with the pipeline definition is still raised before
any step runs: by `await handle` instead of by `submit()`.

Stopping a run whose plan is not made yet (its handle's `cancel()`, closing the stack, a
cancel request) makes the run plan at once and be recorded STOPPED, never started.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from flowcore._engine._handle import RunHandle, execute_owned
from flowcore._engine._lifecycle import end_unrecorded
from flowcore._engine._plan import RunPlan, new_run
from flowcore._engine._run import finish_regardless, record_unstarted
from flowcore._engine._start_gate import StartGate
from flowcore._models import PipelineRun, RunStatus
from flowcore.exceptions import ConfigError

if TYPE_CHECKING:
    from flowcore._pipeline import Pipeline
    from flowcore.config import RunConfigFile
    from flowcore.stack import Stack
    from flowcore.stack._live import LiveRun

__all__ = ["BACKGROUND", "PendingStart", "check_call", "submit_later"]

# Strong references to background runs (the loop keeps only weak ones); each is owned by the
# RunHandle returned to the caller, who awaits or cancels it.
BACKGROUND: set[asyncio.Task[PipelineRun]] = set()

class PendingStart:
    """A submitted run that has no plan yet: how to make it, and how a stop reaches it."""

    # No reference to the handle (which refers to this): no cycle for the collector to find.
    __slots__ = ("_plan_for", "gate", "live", "plan", "run", "stack", "stop_requested",
                 "waiter")

    def __init__(self, plan_for: Callable[[PipelineRun], RunPlan], run: PipelineRun,
                 stack: Stack) -> None:
        self._plan_for = plan_for
        self.run = run
        self.stack = stack
        self.live: LiveRun | None = None
        self.plan: RunPlan | None = None
        self.stop_requested = False
        self.waiter: asyncio.Future[bool] | None = None
        self.gate: StartGate | None = None  # the gate that let the run in, told when it ends

    def made(self) -> RunPlan:
        """The run's plan, made on first use (compiles the pipeline)."""
        if self.plan is None:
            self.plan = self._plan_for(self.run)
        return self.plan

    def request_stop(self, drain: bool = False) -> None:
        """Stop before starting: the run leaves the gate, plans and is recorded STOPPED."""
        self.stop_requested = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    async def record_stopped(self) -> None:
        """Record the run STOPPED, never started (its steps SKIPPED); end its live entry."""
        try:
            try:
                plan = self.made()
            except Exception:  # a definition error: nothing to record (it is raised elsewhere)
                return
            if not plan.started:
                plan.started = True  # recorded once, by whoever gets here first
                await finish_regardless(record_unstarted(plan))
        finally:
            self.finish_live()

    def task_done(self, task: asyncio.Task[PipelineRun]) -> None:
        BACKGROUND.discard(task)
        if self.gate is not None:
            self.gate.ended()
            self.gate = None
        # A task cancelled before it first ran (its loop shut down) never reaches its own
        # cleanup: its live entry must not outlive it, or closing the stack would wait forever.
        if task.cancelled() and self.plan is None:
            self.finish_live()

    def finish_live(self) -> None:
        if self.live is not None:
            self.stack.live_runs.finish(self.live)


class _CallShape:
    """What a function accepts, to tell quickly whether a call binds (`inspect.Signature.bind`
    costs ~10 us a call; this ~1 us). A call that does not fit is bound for the message."""

    __slots__ = ("keywords", "positional", "positional_only", "required", "signature",
                 "var_keyword", "var_positional")

    def __init__(self, signature: inspect.Signature) -> None:
        kinds = inspect.Parameter
        params = list(signature.parameters.values())
        self.signature = signature
        self.positional = [p.name for p in params
                           if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        self.positional_only = {p.name for p in params if p.kind is kinds.POSITIONAL_ONLY}
        self.keywords = {p.name for p in params
                         if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
        self.required = {p.name for p in params if p.default is p.empty
                         and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)}
        self.var_positional = any(p.kind is kinds.VAR_POSITIONAL for p in params)
        self.var_keyword = any(p.kind is kinds.VAR_KEYWORD for p in params)

    def fits(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
        if len(args) > len(self.positional) and not self.var_positional:
            return False
        bound = set(self.positional[:len(args)])
        for key in kwargs:
            if key in self.positional_only:
                if not self.var_keyword:  # else it lands in **kwargs
                    return False
                continue
            if key in bound:
                return False
            if key in self.keywords:
                bound.add(key)
            elif not self.var_keyword:
                return False
        return self.required <= bound


# The pipeline functions' call shapes, read once each.
_shapes: weakref.WeakKeyDictionary[Any, _CallShape] = weakref.WeakKeyDictionary()


def check_call(pipeline: Pipeline, run_config: RunConfigFile | None, args: tuple[Any, ...],
               params: Mapping[str, Any]) -> None:
    """The checks `submit()` makes itself: the parameters against the pipeline function's
    signature (the same ConfigError a compile raises, only sooner).

    Raises:
        ConfigError: a parameter the pipeline function does not take, or one it lacks.
    """
    call_params = {**run_config.parameters, **params} if run_config else params
    func = pipeline.func
    shape = _shapes.get(func)
    if shape is None:
        try:
            shape = _CallShape(inspect.signature(func))
        except (TypeError, ValueError):  # a callable with no signature: the compile will tell
            return
        try:
            _shapes[func] = shape
        except TypeError:  # not weakly referenceable: not kept
            pass
    if shape.fits(args, call_params):
        return
    try:
        shape.signature.bind(*args, **call_params)
    except TypeError as exc:
        raise ConfigError(f"pipeline '{pipeline.name}': {exc}") from None


def submit_later(pipeline: Pipeline, stack: Stack, options: Mapping[str, Any],
                 plan_for: Callable[[PipelineRun], RunPlan]) -> RunHandle:
    """Name the run, start its task and return its handle; the task plans it later
    (`plan_for(run)` compiles and plans into the record made here)."""
    # Few objects per submitted run (a burst of them must not feed the garbage collector
    # much): no closures, one done-callback.
    loop = asyncio.get_running_loop()
    run = new_run(pipeline.name, options.get("run_name"), options.get("substitutions"))
    pending = PendingStart(plan_for, run, stack)
    handle = RunHandle(run=run, pending=pending)
    # Registered now, so that closing the stack also stops runs still waiting for their plan.
    pending.live = stack.live_runs.add(run.id, pending.request_stop)
    task = loop.create_task(_start_later(handle, pending), name=f"flowcore:run:{run.name}")
    handle.attach(task)
    BACKGROUND.add(task)
    task.add_done_callback(pending.task_done)
    StartGate.of_running_loop().submitted()
    return handle


async def _start_later(handle: RunHandle, pending: PendingStart) -> PipelineRun:
    try:
        plan = await _planned_through_gate(pending)
    except asyncio.CancelledError:
        # Cancelled while waiting for its turn: recorded STOPPED like a run cancelled before
        # its task began (the handle's wait() returns it).
        await pending.record_stopped()
        raise
    except BaseException:
        # A definition error: nothing was recorded; the handle's record ends FAILED and
        # `await handle` raises the error.
        end_unrecorded(handle.run, RunStatus.FAILED)
        pending.finish_live()
        raise
    if pending.stop_requested:
        await pending.record_stopped()
        return plan.run
    return await execute_owned(plan)  # takes over the live entry (and any stop asked since)


async def _planned_through_gate(pending: PendingStart) -> RunPlan:
    if pending.stop_requested:
        return pending.made()
    gate = StartGate.of_running_loop()
    waiter = gate.enter()
    if waiter is None:
        pending.gate = gate  # let in at once: the gate counts it until it ends
    else:
        pending.waiter = waiter
        try:
            await waiter  # False: stopped while waiting; it plans now, to be recorded
        finally:
            pending.waiter = None
            if waiter.done() and not waiter.cancelled() and waiter.result():
                pending.gate = gate  # let in (even if cancelled just after)
    began = time.perf_counter()
    try:
        return pending.made()
    finally:
        gate.planned(time.perf_counter() - began)
