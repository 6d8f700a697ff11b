"""Embedding in a service (API.md §17): opening and closing a stack, live runs stopped at
close, run events for one run or for all, and a responsive loop under a burst of runs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flowcore import AsyncClient, RunStatus, Stack, StepStatus, pipeline, step
from flowcore import events as fc_events


@pytest.fixture(params=["memory", "local"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Stack:
    """Both stacks a service might use."""
    return Stack.in_memory() if request.param == "memory" else Stack.local(tmp_path)


@step(enable_cache=False)
async def quick(x: int) -> int:
    return x + 1


@step(enable_cache=False)
async def slow_async(x: int) -> int:
    await asyncio.sleep(30)
    return x


@step(enable_cache=False)
def slow_sync(x: int) -> int:
    time.sleep(1.5)
    return x


@pipeline
def long_running(x: int = 1) -> None:
    slow_async(quick(x))
    slow_sync(quick(x))


@pipeline
def short(x: int = 1) -> None:
    quick(quick(x))


async def test_aclose_stops_every_live_run_and_records_it(stack: Stack) -> None:
    """Closing the stack stops the process's live runs — background ones and one awaited by a
    request handler — each recorded STOPPED, before aclose() returns."""
    p = long_running.with_options(stack=stack)
    handles = [p.submit(x=i) for i in range(3)]
    awaited = asyncio.create_task(p.run(x=9))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await stack.aclose()
    assert time.monotonic() - started < 5
    run = await awaited  # the awaiting caller gets the stopped run, not an exception
    assert run.status is RunStatus.STOPPED
    client = AsyncClient(stack)
    for name in [h.run_name for h in handles] + [run.name]:
        stored = await client.get_pipeline_run(name)
        assert stored.status is RunStatus.STOPPED
        assert all(s.status.is_finished for s in stored.steps.values())
        assert stored.steps["slow_async"].status is StepStatus.STOPPED
    assert len(stack.live_runs) == 0
    await stack.aclose()


async def test_async_with_stack_opens_and_closes(tmp_path: Path) -> None:
    """`async with stack` returns the stack, and leaving it stops what is still running."""
    async with Stack.local(tmp_path) as stack:
        handle = long_running.with_options(stack=stack).submit()
        await asyncio.sleep(0.2)
    assert handle.status is RunStatus.STOPPED
    stored = await AsyncClient(stack).get_pipeline_run(handle.run_name)
    assert stored.status is RunStatus.STOPPED
    await stack.close()


def test_with_stack_from_sync_code_stops_threaded_runs(tmp_path: Path) -> None:
    """`with stack:` from synchronous code stops a non-synchronous run on its own thread."""
    stack = Stack.local(tmp_path)
    with stack:
        handle = long_running.with_options(stack=stack, synchronous=False)()
        time.sleep(0.3)
    assert handle.result(timeout=10).status is RunStatus.STOPPED


async def test_sync_with_stack_on_a_running_loop_says_to_use_async_with() -> None:
    """`with stack:` inside a coroutine is a clear error pointing at `async with stack:`."""
    from flowcore import FlowcoreError

    with pytest.raises(FlowcoreError, match="async with stack"):
        with Stack.in_memory():
            pass


CRASHER = textwrap.dedent(
    """
    import asyncio, sys
    from flowcore import Stack, pipeline, step

    @step(enable_cache=False)
    async def hang() -> None:
        print("RUNNING", flush=True)
        await asyncio.sleep(60)

    @pipeline(run_name="killed_run")
    def p() -> None:
        hang()

    asyncio.run(p.with_options(stack=Stack.local(sys.argv[1])).run())
    """
)


async def test_opening_a_stack_marks_runs_of_dead_processes_crashed(tmp_path: Path) -> None:
    """A run whose process was SIGKILLed reads CRASHED as soon as a stack is opened."""
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(tmp_path / "store"), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.decode().strip() == "RUNNING"
    await asyncio.sleep(0.5)  # status writes are committed within moments, not at once
    os.kill(proc.pid, signal.SIGKILL)
    await asyncio.wait_for(proc.wait(), 30)
    async with Stack.local(tmp_path / "store") as stack:
        run = await AsyncClient(stack).get_pipeline_run("killed_run")
        assert run.status is RunStatus.CRASHED
        assert run.steps["hang"].status is StepStatus.STOPPED


async def test_handle_events_from_the_start_to_run_finished(stack: Stack) -> None:
    """`handle.events()` opened late first yields what already happened, then live events,
    each once, and ends after RunFinished."""
    p = short.with_options(stack=stack)
    handle = p.submit()
    await handle  # everything already happened: all of it is rebuilt from the record
    seen = [e async for e in handle.events()]
    assert isinstance(seen[0], fc_events.RunStarted)
    assert isinstance(seen[-1], fc_events.RunFinished) and seen[-1].status == "completed"
    finished = [e.step for e in seen if isinstance(e, fc_events.StepFinished)]
    assert sorted(finished) == ["quick", "quick_2"]
    assert all(e.run_id == handle.run_id and e.timestamp.tzinfo is not None for e in seen)

    live = long_running.with_options(stack=stack).submit()
    got: list[fc_events.Event] = []

    async def read() -> None:
        async for event in live.events():
            got.append(event)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.2)
    await live.cancel()
    await asyncio.wait_for(reader, 10)
    kinds = [type(e).__name__ for e in got]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    keys = [(type(e).__name__, getattr(e, "step", None), getattr(e, "attempt", None))
            for e in got]
    assert len(keys) == len(set(keys)), f"an event was told twice: {keys}"
    assert got[-1].status == "stopped"  # type: ignore[union-attr]


async def test_subscribe_receives_every_runs_events_until_unsubscribed() -> None:
    """`flowcore.events.subscribe` sees the events of every run; the returned function stops it."""
    received: list[fc_events.Event] = []
    unsubscribe = fc_events.subscribe(received.append)
    try:
        stack = Stack.in_memory()
        a = await short.with_options(stack=stack).run()
        b = await short.with_options(stack=stack).run()
    finally:
        unsubscribe()
    assert {e.run_id for e in received} == {a.id, b.id}
    before = len(received)
    await short.with_options(stack=Stack.in_memory()).run()
    assert len(received) == before


async def test_events_are_frozen_records() -> None:
    """Events cannot be changed by a listener."""
    received: list[fc_events.Event] = []
    unsubscribe = fc_events.subscribe(received.append)
    try:
        await short.with_options(stack=Stack.in_memory()).run()
    finally:
        unsubscribe()
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        received[0].run_id = "x"  # type: ignore[misc]
