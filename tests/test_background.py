"""Background and concurrent runs (API.md section 2): submit, RunHandle, cancel, synchronous=False,
sync calls on a running loop, many runs on one loop, and max_concurrency."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from flowcore import (
    AsyncClient,
    Client,
    FlowcoreError,
    PipelineRun,
    RunFailedError,
    RunHandle,
    RunNameConflictError,
    RunStatus,
    Stack,
    StepStatus,
    get_step_context,
    pipeline,
    step,
)


def flowcore_tasks() -> list[asyncio.Task[Any]]:
    """Tasks on the running loop that flowcore created (named "flowcore:...") and not yet done."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("flowcore:")
            and not t.done()]


# -- submit / RunHandle --------------------------------------------------------------------


async def test_submit_returns_handle_at_once_and_await_gives_run(stack: Stack) -> None:
    """submit() returns a RUNNING RunHandle before any step ends; `await handle` gives the run."""
    gate = asyncio.Event()

    @step(enable_cache=False)
    async def gated() -> int:
        await asyncio.wait_for(gate.wait(), 5)
        return 7

    @pipeline
    def gated_pipeline() -> None:
        gated()

    handle = gated_pipeline.submit()
    assert isinstance(handle, RunHandle)
    assert isinstance(handle.run_name, str) and handle.run_name.startswith("gated_pipeline")
    assert handle.status is RunStatus.RUNNING
    await asyncio.sleep(0.05)
    # The step is blocked on the gate, so the run cannot have ended.
    assert handle.status is RunStatus.RUNNING
    gate.set()
    run = await handle
    assert isinstance(run, PipelineRun)
    assert run.name == handle.run_name
    assert run.status is RunStatus.COMPLETED
    assert handle.status is RunStatus.COMPLETED
    assert run.steps["gated"].output.load() == 7
    stored = await AsyncClient().get_pipeline_run(handle.run_name)
    assert stored.status is RunStatus.COMPLETED
    assert flowcore_tasks() == []


async def test_handle_wait_returns_the_run(stack: Stack) -> None:
    """`await handle.wait()` returns the finished PipelineRun, and waiting twice is fine."""

    @step(enable_cache=False)
    async def quick(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    @pipeline
    def quick_pipeline(x: int = 1) -> None:
        quick(x)

    handle = quick_pipeline.submit(x=41)
    run = await handle.wait()
    assert run.status is RunStatus.COMPLETED
    assert run.steps["quick"].output.load() == 42
    again = await handle.wait()
    assert again.name == run.name
    assert again.status is RunStatus.COMPLETED


async def test_cancelling_the_waiter_does_not_cancel_the_run(memory_stack: Stack) -> None:
    """Timing out on `handle.wait()` leaves the background run going; it still completes."""
    gate = asyncio.Event()

    @step(enable_cache=False)
    async def gated() -> int:
        await asyncio.wait_for(gate.wait(), 5)
        return 1

    @pipeline
    def gated_pipeline() -> None:
        gated()

    handle = gated_pipeline.submit()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(handle.wait(), 0.05)
    assert handle.status is RunStatus.RUNNING
    gate.set()
    run = await handle
    assert run.status is RunStatus.COMPLETED


def test_submit_without_a_running_loop_is_an_error(memory_stack: Stack) -> None:
    """submit() from synchronous code (no running loop) raises a FlowcoreError."""

    @step(enable_cache=False)
    async def noop() -> None:
        return None

    @pipeline
    def noop_pipeline() -> None:
        noop()

    with pytest.raises(FlowcoreError):
        noop_pipeline.submit()


async def test_awaiting_a_failed_background_run_raises(stack: Stack) -> None:
    """`await handle` of a run whose step failed raises RunFailedError carrying the FAILED run."""

    @step(enable_cache=False)
    async def broken() -> None:
        raise ValueError("broken step")

    @pipeline
    def failing() -> None:
        broken()

    handle = failing.submit()
    with pytest.raises(RunFailedError) as info:
        await handle
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.run.name == handle.run_name
    assert info.value.run.status is RunStatus.FAILED
    assert handle.status is RunStatus.FAILED
    assert flowcore_tasks() == []


# -- cancel --------------------------------------------------------------------------------


async def test_cancel_stops_running_steps_and_skips_the_rest(stack: Stack) -> None:
    """cancel() ends the run STOPPED: running steps STOPPED (their bodies saw CancelledError),
    the rest SKIPPED, and no flowcore task is left."""
    started = {"left": asyncio.Event(), "right": asyncio.Event()}
    saw_cancel: list[str] = []
    ran: list[str] = []

    async def long_body(name: str) -> int:
        ran.append(name)
        started[name].set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            saw_cancel.append(name)
            raise
        return 1

    @step(enable_cache=False)
    async def left() -> int:
        return await long_body("left")

    @step(enable_cache=False)
    async def right() -> int:
        return await long_body("right")

    @step(enable_cache=False)
    async def after_left(x: int) -> int:
        ran.append("after_left")
        return x

    @step(enable_cache=False)
    async def join(a: int, b: int) -> int:
        ran.append("join")
        return a + b

    @pipeline
    def cancellable() -> None:
        a = left()
        b = right()
        join(after_left(a), b)

    handle = cancellable.submit()
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 5)
    begin = time.monotonic()
    run = await handle.cancel()
    assert time.monotonic() - begin < 3
    assert isinstance(run, PipelineRun)
    assert run.status is RunStatus.STOPPED
    assert handle.status is RunStatus.STOPPED
    assert {n: sr.status for n, sr in run.steps.items()} == {
        "left": StepStatus.STOPPED, "right": StepStatus.STOPPED,
        "after_left": StepStatus.SKIPPED, "join": StepStatus.SKIPPED,
    }
    assert sorted(saw_cancel) == ["left", "right"]
    assert sorted(ran) == ["left", "right"]
    assert flowcore_tasks() == []
    assert run.end_time is not None
    stored = await AsyncClient().get_pipeline_run(run.name)
    assert stored.status is RunStatus.STOPPED
    assert {n: sr.status for n, sr in stored.steps.items()} == {
        n: sr.status for n, sr in run.steps.items()
    }


async def test_cancel_before_any_step_started(memory_stack: Stack) -> None:
    """Cancelling right after submit ends the run STOPPED with no step body run."""
    ran: list[str] = []

    @step(enable_cache=False)
    async def never() -> None:
        ran.append("never")

    @pipeline
    def early() -> None:
        never()

    handle = early.submit()
    run = await handle.cancel()
    assert run.status is RunStatus.STOPPED
    assert ran == []
    assert run.steps["never"].status in (StepStatus.SKIPPED, StepStatus.STOPPED)
    assert flowcore_tasks() == []


# -- synchronous=False from plain code -----------------------------------------------------


def _gated_pipeline(gate: threading.Event, seen_thread: list[str]) -> Any:
    @step(enable_cache=False)
    def gated(x: int) -> int:
        seen_thread.append(threading.current_thread().name)
        assert gate.wait(10), "the test never opened the gate"
        return x * 2

    @pipeline
    def threaded(x: int = 1) -> None:
        gated(x)

    return threaded


@pytest.mark.parametrize("how", ["with_options", "settings"])
def test_synchronous_false_returns_handle_whose_result_blocks(stack: Stack, how: str) -> None:
    """synchronous=False (keyword or orchestrator setting) makes p() return a RunHandle at once;
    .result(timeout) returns the finished run."""
    gate = threading.Event()
    seen: list[str] = []
    p = _gated_pipeline(gate, seen)
    if how == "with_options":
        p = p.with_options(synchronous=False)
    else:
        p = p.with_options(settings={"orchestrator": {"synchronous": False}})
    try:
        handle = p(x=21)
        # Returned although the only step is still blocked on the gate.
        assert isinstance(handle, RunHandle)
        assert handle.status is RunStatus.RUNNING
        assert not handle.done()
    finally:
        gate.set()
    run = handle.result(timeout=30)
    assert isinstance(run, PipelineRun)
    assert run.status is RunStatus.COMPLETED
    assert run.name == handle.run_name
    assert run.steps["gated"].output.load() == 42
    stored = Client().get_pipeline_run(handle.run_name)
    assert stored.status is RunStatus.COMPLETED


def test_synchronous_false_failed_run_result_raises(memory_stack: Stack) -> None:
    """.result() of a background run whose step failed raises RunFailedError with the run."""

    @step(enable_cache=False)
    def broken() -> None:
        raise ValueError("broken step")

    @pipeline
    def failing() -> None:
        broken()

    handle = failing.with_options(synchronous=False)()
    with pytest.raises(RunFailedError) as info:
        handle.result(timeout=30)
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.run.status is RunStatus.FAILED


def test_synchronous_false_result_timeout(memory_stack: Stack) -> None:
    """.result(timeout) gives up with TimeoutError while the run is still going."""
    gate = threading.Event()
    p = _gated_pipeline(gate, []).with_options(synchronous=False)
    handle = p()
    try:
        with pytest.raises(TimeoutError):
            handle.result(timeout=0.05)
    finally:
        gate.set()
    assert handle.result(timeout=30).status is RunStatus.COMPLETED


def test_plain_call_is_synchronous_by_default(memory_stack: Stack) -> None:
    """Without synchronous=False, p() from plain code blocks and returns the PipelineRun."""
    gate = threading.Event()
    gate.set()
    run = _gated_pipeline(gate, [])(x=2)
    assert isinstance(run, PipelineRun)
    assert run.status is RunStatus.COMPLETED
    assert run.steps["gated"].output.load() == 4


async def test_sync_call_inside_running_loop_says_use_await(memory_stack: Stack) -> None:
    """Calling p() on a thread whose loop runs raises a FlowcoreError/RuntimeError naming `await`."""
    ran: list[str] = []

    @step(enable_cache=False)
    async def body() -> None:
        ran.append("body")

    @pipeline
    def on_loop() -> None:
        body()

    with pytest.raises(FlowcoreError) as info:
        on_loop()
    assert isinstance(info.value, RuntimeError)
    assert "await" in str(info.value)
    assert ran == []
    assert await AsyncClient().list_pipeline_runs(pipeline_name="on_loop") == []


# -- many runs on one loop -----------------------------------------------------------------


async def test_many_concurrent_runs_on_one_loop(stack: Stack) -> None:
    """Twenty concurrent `await p.run()` on one loop all complete, each with its own result and a
    unique default run name."""
    in_flight = 0
    peak = 0

    @step(enable_cache=False)
    async def double(x: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        assert get_step_context().step_run.config.parameters == {"x": x}
        return 2 * x

    @step(enable_cache=False)
    async def plus_one(y: int) -> int:
        await asyncio.sleep(0)
        return y + 1

    @pipeline
    def doubler(x: int = 0) -> None:
        plus_one(double(x))

    n = 20
    runs = await asyncio.gather(*(doubler.run(x=i) for i in range(n)))
    assert len({r.name for r in runs}) == n
    assert len({r.id for r in runs}) == n
    for i, run in enumerate(runs):
        assert run.status is RunStatus.COMPLETED
        assert run.steps["plus_one"].output.load() == 2 * i + 1
    # They really overlapped on the loop.
    assert peak > 1
    listed = await AsyncClient().list_pipeline_runs(pipeline_name="doubler", limit=100)
    assert {r.name for r in listed} == {r.name for r in runs}


async def test_concurrent_runs_with_the_same_name_conflict(stack: Stack) -> None:
    """Of three concurrent runs given the same run_name exactly one runs; the others raise
    RunNameConflictError."""
    bodies: list[int] = []

    @step(enable_cache=False)
    async def body(x: int) -> int:
        bodies.append(x)
        await asyncio.sleep(0.01)
        return x

    @pipeline
    def named(x: int = 0) -> None:
        body(x)

    p = named.with_options(run_name="the_one_and_only")
    results = await asyncio.gather(*(p.run(x=i) for i in range(3)), return_exceptions=True)
    runs = [r for r in results if isinstance(r, PipelineRun)]
    conflicts = [r for r in results if isinstance(r, RunNameConflictError)]
    assert len(runs) == 1 and len(conflicts) == 2, results
    assert runs[0].name == "the_one_and_only"
    assert len(bodies) == 1
    listed = await AsyncClient().list_pipeline_runs(pipeline_name="named")
    assert [r.name for r in listed] == ["the_one_and_only"]


# -- max_concurrency -----------------------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_max_concurrency_two_of_ten_ready(memory_stack: Stack, sync: bool) -> None:
    """With max_concurrency=2 and ten ready steps, never more than two bodies run at once."""
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "done": 0}

    def enter() -> None:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])

    def leave() -> None:
        with lock:
            state["now"] -= 1
            state["done"] += 1

    if sync:

        def work(i: int) -> int:
            enter()
            time.sleep(0.02)
            leave()
            return i

    else:

        async def work(i: int) -> int:  # type: ignore[misc]
            enter()
            await asyncio.sleep(0.02)
            leave()
            return i

    work_step = step(enable_cache=False)(work)

    @pipeline
    def wide() -> None:
        for i in range(10):
            work_step(i)

    run = await wide.with_options(max_concurrency=2).run()
    assert run.status is RunStatus.COMPLETED
    assert len(run.steps) == 10
    assert state["done"] == 10
    assert state["peak"] == 2

    # The same pipeline unlimited does run more than two at once (the counter can see it).
    state.update(now=0, peak=0, done=0)
    await wide.run()
    assert state["peak"] > 2
