"""API.md section 13 under cancellation: random DAGs of slow, failing, retried and timed-out sync
and async steps, cancelled at a random moment in a random way, in every execution mode, on
the in-memory and the SQLite stack; then checks on the rows read back through AsyncClient:
(a) terminal rows when the call ends, (b) no body starts after a failure (FAIL_FAST,
STOP_ON_FAILURE), (c) no two bodies of a step at once, (d) a BaseException fails the step with
its hooks, (e) rows unchanged once abandoned bodies return, (f) the right result or exception.

Followed by plain regression tests for the exact bugs reported against the engine.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from _dag_strategies import (
    CANCELS,
    DELAYS,
    BodyAbort,
    DagSpec,
    Outcome,
    Rows,
    Trace,
    build,
    call,
    check_trace,
    dags,
    read_rows,
    settle,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from flowcore import (
    AsyncClient,
    ExecutionMode,
    PipelineRun,
    RunFailedError,
    RunStatus,
    Stack,
    StepRetryConfig,
    StepStatus,
    pipeline,
    step,
)

RUN_DONE = {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.STOPPED}
STEP_DONE = {StepStatus.COMPLETED, StepStatus.CACHED, StepStatus.FAILED, StepStatus.SKIPPED,
             StepStatus.STOPPED}
# A run of these DAGs ends within a few seconds; one still going after this hangs.
HANG = 30.0


def check_outcome(cancel: str, out: Outcome, rows: Rows, tr: Trace) -> list[str]:
    """(f) the result or exception fits how the run ended and how it was cancelled."""
    bad: list[str] = []
    if rows.status not in RUN_DONE:
        return bad  # reported as (a)
    failed_steps = [n for n, s in rows.steps.items() if s[0] is StepStatus.FAILED]
    if (rows.status is RunStatus.FAILED) != bool(failed_steps) and rows.status is not RunStatus.STOPPED:
        bad.append(f"run is {rows.status} but failed steps are {failed_steps}")
    if rows.status is RunStatus.COMPLETED and any(
            s[0] not in (StepStatus.COMPLETED, StepStatus.CACHED) for s in rows.steps.values()):
        bad.append("run is COMPLETED with steps that did not complete")
    returned = out.result if out.result is not None else getattr(out.raised, "run", None)
    if isinstance(returned, PipelineRun):
        if returned.status is not rows.status:
            bad.append(f"returned run is {returned.status}, stored run is {rows.status}")
        for name, sr in returned.steps.items():
            if name in rows.steps and sr.status is not rows.steps[name][0]:
                bad.append(f"returned {name} is {sr.status}, stored {rows.steps[name][0]}")
    if out.effective:
        assert out.cancel_time is not None
        expected: Any = {"task": asyncio.CancelledError, "asyncio_timeout": TimeoutError}.get(cancel)
        if expected is not None and not isinstance(out.raised, expected):
            bad.append(f"{cancel} cancellation: expected {expected.__name__}, got {out.raised!r} "
                       f"/ result {out.result!r}")
        if expected is None and out.raised is not None:
            bad.append(f"{cancel} cancellation: unexpected {out.raised!r}")
        fails = [at for at, _, _ in tr.failures]
        busy = any(e is None or e > out.cancel_time + 0.05 for e in tr.exits())
        if rows.status is RunStatus.FAILED and not (fails and min(fails) < out.cancel_time + 0.05):
            bad.append(f"cancelled at {tr.rel(out.cancel_time)} before any failure, yet FAILED")
        if rows.status is RunStatus.COMPLETED and busy:
            bad.append(f"cancelled at {tr.rel(out.cancel_time)} while bodies/hooks ran, yet COMPLETED")
    elif rows.status is RunStatus.STOPPED:
        bad.append(f"no cancellation reached the call ({cancel}), yet the run is STOPPED")
    elif rows.status is RunStatus.COMPLETED and not isinstance(out.result, PipelineRun):
        bad.append(f"run COMPLETED but the call gave {out.raised!r}")
    elif rows.status is RunStatus.FAILED and cancel != "handle" and not isinstance(
            out.raised, RunFailedError):
        bad.append(f"run FAILED but the call gave {out.raised!r} / {out.result!r}")
    return bad


async def exercise(spec: DagSpec, mode: ExecutionMode, stack: Stack, cancel: str, delay: float,
                   tr: Trace) -> list[str]:
    """Run, cancel and check one example; the list of broken invariants."""
    out = await call(build(spec, mode, tr).with_options(stack=stack), cancel, delay)
    rows = await read_rows(stack, out.run_name)
    bad: list[str] = []
    if rows is None:
        if not out.effective or tr.bodies:
            bad.append(f"run never stored; call gave {out.raised!r} / {out.result!r}")
    else:
        if rows.status not in RUN_DONE:
            bad.append(f"(a) run is {rows.status} when the call ended")
        if set(rows.steps) != set(spec.ids):
            bad.append(f"(a) stored steps {sorted(rows.steps)}")
        for name, (status, *_) in rows.steps.items():
            if status not in STEP_DONE:
                bad.append(f"(a) {name} is {status} when the call ended")
    await settle(tr)
    if tr.unfinished():
        bad.append(f"{tr.unfinished()} bodies/hooks still running 3 s after the call ended")
    if rows is not None:
        later = await read_rows(stack, out.run_name)
        if later != rows:
            bad.append(f"(e) rows changed after the call ended: {rows} -> {later}")
        bad += check_outcome(cancel, out, rows, tr)
        bad += check_trace(spec, mode, rows, tr, out.effective or rows.status is RunStatus.STOPPED)
    return bad


# No shrink phase: shrinking a timing example reruns it hundreds of times; the failing example
# is printed as drawn, and replayed first next time from the example database.
SETTINGS = settings(max_examples=20, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])


@pytest.mark.parametrize("stack_kind", ["memory", "sqlite"])
@pytest.mark.parametrize("mode", list(ExecutionMode), ids=lambda m: m.value)
@SETTINGS
@given(spec=dags(), cancel=st.sampled_from(CANCELS), delay=st.sampled_from(DELAYS))
def test_random_cancellation_keeps_section_13(mode: ExecutionMode, stack_kind: str, spec: DagSpec,
                                              cancel: str, delay: float) -> None:
    """Whatever the DAG, mode, stack and cancellation, the invariants of API.md section 13 hold."""
    tmp = tempfile.mkdtemp(prefix="flowcore-cancel-") if stack_kind == "sqlite" else None
    tr = Trace()

    async def main() -> list[str]:
        stack = Stack.in_memory() if tmp is None else Stack.local(tmp)
        try:
            return await asyncio.wait_for(exercise(spec, mode, stack, cancel, delay, tr), HANG)
        finally:
            await stack.close()

    try:
        bad = asyncio.run(main())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    assert not bad, "\n".join(bad)


# -- the reported bugs, one plain test each ----------------------------------------------------


async def stored_statuses(stack: Stack, run_name: str) -> tuple[RunStatus, dict[str, StepStatus]]:
    """The stored status of a run and of each of its steps."""
    run = await AsyncClient(stack).get_pipeline_run(run_name)
    return run.status, {name: sr.status for name, sr in run.steps.items()}


async def test_move_on_after_around_run_leaves_it_stopped(stack: Stack) -> None:
    """An anyio cancel scope expiring during `await p.run()` leaves the stored run and step STOPPED."""

    @step(enable_cache=False)
    async def long_step() -> int:
        await asyncio.sleep(2)
        return 1

    @pipeline
    def scoped() -> None:
        long_step()

    await AsyncClient(stack).list_pipeline_runs()  # the store is open: the run is stored at once
    with anyio.move_on_after(0.1) as scope:
        await scoped.with_options(run_name="scoped_run").run()
    assert scope.cancelled_caught
    assert await stored_statuses(stack, "scoped_run") == (
        RunStatus.STOPPED, {"long_step": StepStatus.STOPPED})


async def test_cancelled_background_run_of_parallel_sync_steps_is_terminal(stack: Stack) -> None:
    """`await handle.cancel()` on four parallel sync steps leaves every stored row terminal, at once
    and after the abandoned bodies return."""

    started: list[int] = []

    @step(enable_cache=False)
    def sleeper(k: int) -> int:
        started.append(k)
        time.sleep(0.5)
        return k

    @pipeline
    def parallel() -> None:
        for k in range(4):
            sleeper(k)

    handle = parallel.submit()
    for _ in range(250):
        if len(started) == 4:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    run = await handle.cancel()
    assert run.status is RunStatus.STOPPED
    first = await stored_statuses(stack, handle.run_name)
    assert first[0] is RunStatus.STOPPED
    assert len(first[1]) == 4 and set(first[1].values()) <= STEP_DONE, first
    await asyncio.sleep(0.6)
    assert await stored_statuses(stack, handle.run_name) == first


async def test_fail_fast_cancels_running_sibling_before_failure_hook(stack: Stack) -> None:
    """FAIL_FAST: the sibling running when a step fails is STOPPED before the failed step's slow
    on_failure hook runs, not left to complete."""
    t0 = time.monotonic()
    seen: dict[str, float] = {}

    async def slow_hook() -> None:
        seen["hook"] = time.monotonic() - t0
        await asyncio.sleep(1.0)

    @step(enable_cache=False, on_failure=slow_hook)
    async def breaks() -> None:
        await asyncio.sleep(0.05)
        seen["failed"] = time.monotonic() - t0
        raise ValueError("breaks")

    @step(enable_cache=False)
    async def sibling() -> int:
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            seen["sibling_cancelled"] = time.monotonic() - t0
            raise
        seen["sibling_done"] = time.monotonic() - t0
        return 1

    @pipeline(execution_mode=ExecutionMode.FAIL_FAST)
    def fast() -> None:
        breaks()
        sibling()

    with pytest.raises(RunFailedError):
        await fast.with_options(run_name="fast_run").run()
    assert "sibling_done" not in seen, seen
    assert seen["sibling_cancelled"] <= seen["hook"] + 0.05, seen
    assert await stored_statuses(stack, "fast_run") == (
        RunStatus.FAILED, {"breaks": StepStatus.FAILED, "sibling": StepStatus.STOPPED})


async def test_stop_on_failure_starts_nothing_while_failure_hook_runs(stack: Stack) -> None:
    """STOP_ON_FAILURE: a step that becomes ready while a failed step's on_failure hook runs is
    SKIPPED and never starts; the step already running is drained."""
    started: list[str] = []

    async def slow_hook() -> None:
        await asyncio.sleep(0.5)

    @step(enable_cache=False, on_failure=slow_hook)
    async def breaks() -> None:
        await asyncio.sleep(0.05)
        raise ValueError("breaks")

    @step(enable_cache=False)
    async def drained() -> int:
        await asyncio.sleep(0.15)
        return 1

    @step(enable_cache=False)
    async def child(x: int) -> int:
        started.append("child")
        return x

    @pipeline(execution_mode=ExecutionMode.STOP_ON_FAILURE)
    def stopper() -> None:
        breaks()
        child(drained())

    with pytest.raises(RunFailedError):
        await stopper.with_options(run_name="stop_run").run()
    assert started == []
    assert await stored_statuses(stack, "stop_run") == (RunStatus.FAILED, {
        "breaks": StepStatus.FAILED, "drained": StepStatus.COMPLETED, "child": StepStatus.SKIPPED})


async def test_stop_on_failure_step_queued_for_the_slot_never_starts(stack: Stack) -> None:
    """STOP_ON_FAILURE with max_concurrency=1: of three failing roots only the first to get the
    slot runs; the two queued for it are SKIPPED."""
    started: list[str] = []

    @step(enable_cache=False)
    async def breaks(k: int) -> None:
        started.append(f"breaks{k}")
        await asyncio.sleep(0.05)
        raise ValueError(f"breaks {k}")

    @pipeline(execution_mode=ExecutionMode.STOP_ON_FAILURE, max_concurrency=1)
    def queued() -> None:
        for k in range(3):
            breaks(k)

    with pytest.raises(RunFailedError):
        await queued.with_options(run_name="queued_run").run()
    assert len(started) == 1, started
    status, steps = await stored_statuses(stack, "queued_run")
    assert status is RunStatus.FAILED
    assert sorted(steps.values()) == sorted([StepStatus.FAILED] + [StepStatus.SKIPPED] * 2), steps


async def test_sync_step_retry_after_timeout_waits_for_the_old_body(stack: Stack) -> None:
    """A sync step timing out (0.1 s) and retried never has two bodies running at once."""
    spans: list[list[float]] = []

    @step(enable_cache=False, timeout=0.1, retry=StepRetryConfig(max_retries=1, delay=0))
    def stuck() -> int:
        span = [time.monotonic()]
        spans.append(span)
        time.sleep(0.4)
        span.append(time.monotonic())
        return 1

    @pipeline
    def timing() -> None:
        stuck()

    with pytest.raises(RunFailedError):
        await timing.with_options(run_name="timing_run").run()
    for _ in range(100):
        if len(spans) == 2 and all(len(s) == 2 for s in spans):
            break
        await asyncio.sleep(0.02)
    assert len(spans) == 2
    assert spans[1][0] >= spans[0][1], f"attempt 2 began {spans[0][1] - spans[1][0]:.3f}s too early"
    run = await AsyncClient(stack).get_pipeline_run("timing_run")
    assert run.steps["stuck"].status is StepStatus.FAILED
    assert run.steps["stuck"].attempts == 2


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_base_exception_from_body_fails_step_with_hooks(stack: Stack, sync: bool) -> None:
    """A body raising a BaseException that is not an Exception fails the step, and its on_failure
    and on_end hooks run."""
    hooks: list[str] = []

    def on_failure(exception: BaseException) -> None:
        hooks.append(f"on_failure:{type(exception).__name__}")

    def on_end(exception: BaseException | None) -> None:
        hooks.append(f"on_end:{type(exception).__name__}")

    def sync_body() -> int:
        raise BodyAbort("abort")

    async def async_body() -> int:
        raise BodyAbort("abort")

    body: Callable[[], Any] = sync_body if sync else async_body
    aborts = step(enable_cache=False, on_failure=on_failure, on_end=on_end)(body)

    @pipeline
    def aborting() -> None:
        aborts(step_name="aborts")

    with pytest.raises(RunFailedError):
        await aborting.with_options(run_name="abort_run").run()
    run = await AsyncClient(stack).get_pipeline_run("abort_run")
    assert run.steps["aborts"].status is StepStatus.FAILED
    assert run.steps["aborts"].error is not None and run.steps["aborts"].error.type == "BodyAbort"
    assert hooks == ["on_failure:BodyAbort", "on_end:BodyAbort"]


async def test_run_failed_error_names_the_failing_mapped_element(stack: Stack) -> None:
    """RunFailedError's message names a failing mapped element by its own ID, `racer[0]`."""

    @step(enable_cache=False)
    def lanes() -> list[int]:
        return [0, 1, 2]

    @step(enable_cache=False)
    async def racer(lane: int) -> int:
        if lane == 0:
            raise ValueError("lane 0 crashed")
        return lane

    @pipeline
    def race() -> None:
        racer.map(lanes())

    with pytest.raises(RunFailedError) as info:
        await race.run()
    assert "racer[0]" in str(info.value)
