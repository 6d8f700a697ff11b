"""The only code that changes a run's or a step's status.

Every transition is one call here, which sets the status and its time, queues the store write,
emits the log event and the listener event (httpcore's `_trace.py`: one emitter per event).
Statuses only move forward: once a step run is terminal, no call changes it again, so a late
path (a cancellation racing a completion, an abandoned body returning) can never rewrite it.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from typing import Any

from flowcore import _logging as flog
from flowcore import events
from flowcore._clock import utcnow
from flowcore._hooks import BoundHook
from flowcore._models import (
    ArtifactVersion,
    ErrorInfo,
    HookError,
    PipelineRun,
    RunStatus,
    StepRun,
    StepStatus,
)
from flowcore.stores._base import MetadataStore

__all__ = ["Lifecycle", "error_info"]

_INFO = logging.INFO


def error_info(exc: BaseException) -> ErrorInfo:
    """The type, message and traceback text of an exception."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception as str_error:  # a broken __str__ must not break the run
        message = f"<unprintable {type(exc).__name__}: {str_error!r}>"
    return ErrorInfo(type=type(exc).__name__, message=message, traceback=tb)


def emit(event: events.Event) -> None:
    """Tell every listener; one that raises is logged and never breaks a run."""
    for listener in list(events.listeners):
        try:
            listener(event)
        except Exception:  # a display must never break a run
            flog.stdlib_logger.debug("event listener failed", exc_info=True)


def end_unrecorded(run: PipelineRun, status: RunStatus) -> None:
    """A submitted run that ended before it had a plan (a definition error, or stopped before
    its task ever ran): nothing was recorded; its handle's record ends here, told once."""
    if run.status.is_finished:
        return
    run.status = status
    run.end_time = utcnow()
    emit(events.RunFinished(run.id, run.name, status.value, run.end_time))


class Lifecycle:
    """Status transitions of one run and its step runs."""

    __slots__ = ("log_on", "record", "run", "store")

    def __init__(self, run: PipelineRun, store: MetadataStore) -> None:
        self.run = run
        self.store = store
        self.record = store.record_step_run
        # Read once per run: a filtered-out level costs nothing per transition.
        self.log_on = flog.enabled(_INFO)

    # -- the run ---------------------------------------------------------------------------

    def run_started(self) -> None:
        run = self.run
        if self.log_on:
            flog.log(_INFO, "run_started", run=run.name, pipeline=run.pipeline_name,
                     steps=len(run.steps), pid=os.getpid(), host=socket.gethostname())
        if events.listeners:
            emit(events.RunStarted(run.id, run.name, run.pipeline_name,
                                    tuple(run.steps), run.start_time))

    async def run_finished(self, status: RunStatus) -> None:
        """Finish every step still open, commit every queued write, then the run's own row.

        Callers run this shielded from cancellation (see `_run.finish_regardless`).
        """
        run = self.run
        if run.status.is_finished:
            return
        now = utcnow()
        for sr in run.steps.values():
            if not sr.status.is_finished:
                self._finish(sr, StepStatus.STOPPED if sr.status in (
                    StepStatus.RUNNING, StepStatus.RETRYING) else StepStatus.SKIPPED, now)
        run.status = status
        run.end_time = now
        try:
            await self.store.flush()
        finally:
            await self.store.update_run(run)
        flog.log(_INFO, f"run_{status.value}", run=run.name, pipeline=run.pipeline_name)
        if events.listeners:
            emit(events.RunFinished(run.id, run.name, status.value, now))

    # -- steps -----------------------------------------------------------------------------

    def step_running(self, sr: StepRun, attempt: int) -> bool:
        """The step's attempt `attempt` begins; False if the step already ended."""
        if sr.status.is_finished:
            return False
        sr.attempts = attempt
        sr.status = StepStatus.RUNNING
        self.record(self.run, sr)
        if self.log_on:
            # Each step runs in a task (or thread) of its own context: binding here never
            # leaks into another step.
            flog.bind_step(self.run.name, sr.name, attempt)
            flog.log(_INFO, "step_started", run=self.run.name, step=sr.name, attempt=attempt)
        if events.listeners:
            emit(events.StepStarted(self.run.id, sr.name, attempt, utcnow(), sr.waited))
        return True

    def step_retrying(self, sr: StepRun, attempt: int, exc: BaseException, delay: float) -> bool:
        if sr.status.is_finished:
            return False
        sr.status = StepStatus.RETRYING
        sr.error = error_info(exc)
        self.record(self.run, sr)
        if self.log_on:
            flog.log(_INFO, "step_retrying", run=self.run.name, step=sr.name, attempt=attempt,
                     delay=delay, error=repr(exc))
        if events.listeners:
            emit(events.StepRetrying(self.run.id, sr.name, attempt, delay, repr(exc), utcnow()))
        return True

    def step_completed(self, sr: StepRun, outputs: dict[str, ArtifactVersion],
                       logs: str | None, duration: float | None = None) -> bool:
        if sr.status.is_finished:
            return False
        sr.outputs = outputs
        sr.error = None
        if logs:
            sr.logs = logs
        self._finish(sr, StepStatus.COMPLETED, utcnow(), duration=duration)
        return True

    def step_cached(self, sr: StepRun, outputs: dict[str, ArtifactVersion], origin: str) -> bool:
        if sr.status.is_finished:
            return False
        sr.outputs = outputs
        sr.cache_miss_reason = None
        if self.log_on:
            flog.log(_INFO, "cache_hit", run=self.run.name, step=sr.name, cached_from=origin)
        self._finish(sr, StepStatus.CACHED, utcnow())
        return True

    def step_failed(self, sr: StepRun, exc: BaseException | None,
                    logs: str | None = None) -> bool:
        if sr.status.is_finished:
            return False
        if exc is not None:
            sr.error = error_info(exc)
        if logs:
            sr.logs = logs
        self._finish(sr, StepStatus.FAILED, utcnow(), exc=exc)
        return True

    def step_stopped(self, sr: StepRun, logs: str | None = None) -> bool:
        """A step that began ends because the run is stopping (its body was cancelled or its
        next attempt will not start); one that never began is skipped instead."""
        if sr.status.is_finished:
            return False
        if logs and sr.logs is None:
            sr.logs = logs  # stopped mid-step: keep what it printed
        began = sr.status in (StepStatus.RUNNING, StepStatus.RETRYING)
        self._finish(sr, StepStatus.STOPPED if began else StepStatus.SKIPPED, utcnow())
        return True

    def steps_skipped(self, step_runs: list[StepRun]) -> None:
        now = None
        for sr in step_runs:
            if sr.status is StepStatus.PENDING:
                if now is None:
                    now = utcnow()
                self._finish(sr, StepStatus.SKIPPED, now)

    def step_added(self, sr: StepRun) -> None:
        """A step run that exists only from now on (an element of a `.map()`)."""
        self.run.steps[sr.name] = sr

    def cache_missed(self, sr: StepRun, reason: str, *, uncacheable: bool = False) -> None:
        sr.cache_miss_reason = reason
        if self.log_on:
            flog.log(_INFO, "cache_uncacheable" if uncacheable else "cache_miss",
                     run=self.run.name, step=sr.name, reason=reason)

    def hook_failed(self, sr: StepRun, hook: BoundHook, exc: BaseException) -> None:
        """A hook raised: logged at ERROR and recorded; the step's status does not change."""
        sr.hook_errors.append(HookError(hook=hook.label, kind=hook.kind, error=error_info(exc)))
        flog.stdlib_logger.error(
            "hook_failed run=%s step=%s hook=%s kind=%s error=%r",
            self.run.name, sr.name, hook.label, hook.kind, exc,
            exc_info=exc,
            extra={"flowcore_event": "hook_failed",
                   "flowcore": {"run": self.run.name, "step": sr.name, "hook": hook.label,
                                "kind": hook.kind, "error": repr(exc)}},
        )
        self.record(self.run, sr)

    def _finish(self, sr: StepRun, status: StepStatus, now: Any, *,
                exc: BaseException | None = None, duration: float | None = None) -> None:
        sr.status = status
        sr.end_time = now
        self.record(self.run, sr)
        if status is StepStatus.FAILED:
            flog.log(logging.ERROR, "step_failed", run=self.run.name, step=sr.name,
                     attempt=sr.attempts, error=repr(exc))
        elif self.log_on and status is not StepStatus.CACHED:
            if duration is not None:
                flog.log(_INFO, f"step_{status.value}", run=self.run.name, step=sr.name,
                         attempt=sr.attempts, duration=round(duration, 6))
            else:
                flog.log(_INFO, f"step_{status.value}", run=self.run.name, step=sr.name)
        if events.listeners:
            emit(events.StepFinished(self.run.id, sr.name, status.value, sr.attempts,
                                      str(sr.error) if sr.error else None, now, sr.waited))
