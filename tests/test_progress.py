"""`flowcore.progress()`: plain lines off a terminal, a live rich table when asked for one,
on and off as a function or a context manager, never mixed into a step's captured logs, and
the time a step waited for a pool slot."""

from __future__ import annotations

import asyncio
import io
import re
import sys

import pytest
from _pool_pipelines import contended

import flowcore
from flowcore import (
    RunFailedError,
    Stack,
    StepRetryConfig,
    events,
    get_step_context,
    pipeline,
    step,
)
from flowcore._runview import format_duration, waited_noticeably
from flowcore.testing import FakeClock


@step
def source(n: int = 2) -> int:
    return n


@step(enable_cache=False, retry=StepRetryConfig(max_retries=2, delay=10))
def wobbly(value: int) -> int:
    if get_step_context().step_run.attempt < 2:
        raise ConnectionError("try again")
    return value


@step(enable_cache=False)
def broken(value: int) -> int:
    raise ValueError(f"broken {value}")


@step(enable_cache=False)
def after_broken(value: int) -> int:
    return value


@pipeline
def shown(n: int = 2) -> None:
    value = source(n)
    wobbly(value)
    after_broken(broken(value))


def run_shown(clock: FakeClock | None = None) -> flowcore.PipelineRun:
    """Run `shown` (failing) to the end and return the run."""
    with pytest.raises(RunFailedError) as info:
        shown.with_options(clock=clock or FakeClock())()
    assert info.value.run is not None
    return info.value.run


def body(text: str) -> list[str]:
    """The lines without their HH:MM:SS time stamps."""
    out = []
    for line in text.splitlines():
        assert re.match(r"\d\d:\d\d:\d\d ", line), line
        out.append(line[9:])
    return out


def test_plain_lines_tell_the_story_of_a_run(stack: Stack) -> None:
    """Off a terminal each change is one line: start, running, retrying, cached, failed,
    skipped, and the run's end with its counts."""
    buf = io.StringIO()
    with flowcore.progress(stream=buf) as display:
        assert not display.live and display.active
        first = run_shown()
        second = run_shown()
    lines = body(buf.getvalue())
    n = lines.index(f"run {second.name} started: pipeline shown, 4 steps")
    one, two = lines[:n], lines[n:]
    assert one[0] == f"run {first.name} started: pipeline shown, 4 steps"
    assert one[1] == "source: running" and one[2].startswith("source: completed in ")
    assert "wobbly: attempt 1 failed (ConnectionError('try again')), retrying in 10.00s" in one
    assert "wobbly: running (attempt 2)" in one
    assert any(x.startswith("wobbly: completed in ") and x.endswith(" after 2 attempts")
               for x in one)
    assert "broken: failed after 1 attempt: ValueError: broken 2" in one
    assert "after_broken: skipped" in one
    assert re.fullmatch(rf"run {first.name} failed in \S+: 2 completed, 1 failed, 1 skipped",
                        one[-1])
    assert two[0] == f"run {second.name} started: pipeline shown, 4 steps"
    assert "source: cached" in two and "source: running" not in two
    assert two[-1].endswith(": 1 completed, 1 cached, 1 failed, 1 skipped")


def test_context_manager_and_function_turn_the_display_on_and_off(memory_stack: Stack) -> None:
    """`with progress()` shows only the runs inside the block; `progress()` stays on until
    `progress(False)`; a new display replaces the last."""
    inside, later = io.StringIO(), io.StringIO()
    with flowcore.progress(stream=inside):
        run_shown()
    run_shown()
    assert inside.getvalue().count(" started: ") == 1
    assert events.listeners == []

    display = flowcore.progress(stream=later)
    try:
        run_shown()
        replaced = flowcore.progress(stream=io.StringIO())
        assert not display.active and replaced.active
        run_shown()
    finally:
        off = flowcore.progress(False)
    assert not off.active and not replaced.active
    run_shown()
    assert later.getvalue().count(" started: ") == 1
    assert events.listeners == []


def test_live_table_shows_statuses_and_a_retry_countdown(memory_stack: Stack) -> None:
    """The live view (rich) redraws one table per run, counting down a retry's wait, and
    ends showing every step's final status and the error."""
    pytest.importorskip("rich")

    @step(enable_cache=False, retry=StepRetryConfig(max_retries=1, delay=0.8))
    def slow_retry(value: int) -> int:
        if get_step_context().step_run.attempt < 2:
            raise ConnectionError("not yet")
        return value

    @pipeline
    def live_pipe() -> None:
        value = source(3)
        slow_retry(value)
        broken(value)

    buf = io.StringIO()
    with flowcore.progress(stream=buf, live=True) as display:
        assert display.live
        with pytest.raises(RunFailedError):
            live_pipe()
    screen = buf.getvalue()
    assert "\x1b[?25l" in screen and "\x1b[?25h" in screen  # cursor hidden, then shown again
    countdowns = [float(x) for x in re.findall(r"retry in (\d+\.\d)s", screen)]
    assert countdowns and max(countdowns) >= 0.5 and min(countdowns) < max(countdowns)
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen[screen.rindex("live_pipe-"):])
    assert re.search(r"slow_retry\s+completed\s+2", final), final
    assert re.search(r"broken\s+failed\s+1.*ValueError: broken 3", final), final
    assert "failed" in final.splitlines()[0]


async def test_progress_lines_never_land_in_a_steps_captured_logs(
        memory_stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """A display made while another run captures output writes to the real stream, not into
    the captured logs of the steps it reports on."""
    gate, entered = asyncio.Event(), asyncio.Event()

    @step(enable_cache=False)
    async def waits() -> None:
        entered.set()
        await gate.wait()

    @pipeline
    def blocker() -> None:
        waits()

    @step(enable_cache=False)
    def talks() -> None:
        print("talking")

    @pipeline
    def talker() -> None:
        talks()

    handle = blocker.submit()
    await entered.wait()
    assert type(sys.stderr).__name__ == "_Tee"  # the blocker's capture is installed
    try:
        with flowcore.progress():  # sys.stderr is a capture tee right now
            run = await talker.run()
    finally:
        gate.set()
        await handle
    assert run.steps["talks"].logs == "talking\n"
    err = capsys.readouterr().err
    assert "talks: running" in err and "talks: completed" in err


def test_a_step_that_waited_for_a_pool_slot_says_how_long(stack: Stack) -> None:
    """Three steps contending for a pool of one: each step that waited for the slot says how
    long on its running and its completed line, and the one that did not wait says nothing."""
    buf = io.StringIO()
    with flowcore.progress(stream=buf):
        run = contended.with_options(stack=stack.with_pools(gpu=1))()
    lines = body(buf.getvalue())
    waited = {s.name: s.waited for s in run.steps.values() if waited_noticeably(s.waited)}
    assert len(waited) >= 2 and max(waited.values()) > 0.2, run.steps
    for name in run.steps:
        finished = next(x for x in lines if x.startswith(f"{name}: completed in "))
        if name in waited:
            said = f"waited {format_duration(waited[name])} for a pool slot"
            assert f"{name}: running ({said})" in lines, lines
            assert finished.endswith(f", {said}"), finished
        else:
            assert "waited" not in finished, finished


def test_live_table_shows_the_time_a_step_waited_for_a_pool_slot(memory_stack: Stack) -> None:
    """In the live table a step that waited for a pool slot shows how long in its row."""
    pytest.importorskip("rich")
    buf = io.StringIO()
    with flowcore.progress(stream=buf, live=True):
        run = contended.with_options(stack=memory_stack.with_pools(gpu=1))()
    screen = buf.getvalue()
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen[screen.rindex(run.name):])
    waited = [s for s in run.steps.values() if waited_noticeably(s.waited)]
    assert len(waited) >= 2
    for s in waited:
        assert re.search(rf"{s.name}\s+completed\s+1\s+\S+\s+waited "
                         rf"{re.escape(format_duration(s.waited))} for a pool slot", final), final
