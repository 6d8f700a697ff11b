"""The seed's 8-step table (API.md section 3) in FAIL_FAST, STOP_ON_FAILURE and CONTINUE_ON_FAILURE.

Graph: 1 -> {2, 3, 4}; 2 -> 5; 3 -> 6; 4 -> 7; {5, 6, 7} -> 8. Step 2 fails only once 3 and 4
have started, and 3 and 4 keep running until step 2 is recorded FAILED, so they are genuinely
running when it fails.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from flowcore import (
    AsyncClient,
    ConfigError,
    ExecutionMode,
    Pipeline,
    PipelineRun,
    RunFailedError,
    RunStatus,
    Stack,
    StepStatus,
    get_step_context,
    pipeline,
    step,
)

C, F, S, X = StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.STOPPED

EXPECTED: dict[ExecutionMode, dict[str, StepStatus]] = {
    ExecutionMode.FAIL_FAST: {
        "one": C, "two": F, "three": X, "four": X,
        "five": S, "six": S, "seven": S, "eight": S,
    },
    ExecutionMode.STOP_ON_FAILURE: {
        "one": C, "two": F, "three": C, "four": C,
        "five": S, "six": S, "seven": S, "eight": S,
    },
    ExecutionMode.CONTINUE_ON_FAILURE: {
        "one": C, "two": F, "three": C, "four": C,
        "five": S, "six": C, "seven": C, "eight": S,
    },
}

ALL_MODES = list(ExecutionMode)


class StepTwoBroke(Exception):
    """The failure step 2 raises."""


@dataclass
class Table:
    """Shared state of one build of the 8-step pipeline."""

    hold: float  # how long 3 and 4 keep running after step 2 has been recorded FAILED
    error: StepTwoBroke = field(default_factory=lambda: StepTwoBroke("step two broke"))
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    saw_two_failed: list[str] = field(default_factory=list)
    # async flavour
    sibling_started: dict[str, asyncio.Event] = field(default_factory=dict)
    # sync flavour
    thread_started: dict[str, threading.Event] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)


def _two_status() -> StepStatus:
    return get_step_context().pipeline_run.steps["two"].status


def build_async(hold: float, *, two_waits: bool = True, **options: Any) -> tuple[Pipeline, Table]:
    """The table with `async def` steps (step 2 fails at once if not `two_waits`)."""
    t = Table(hold=hold)
    t.sibling_started = {"three": asyncio.Event(), "four": asyncio.Event()}

    async def sibling(name: str, x: int) -> int:
        t.started.append(name)
        t.sibling_started[name].set()
        try:
            async with asyncio.timeout(5):
                # Polling the live run is the point: nothing else signals step 2's failure.
                while _two_status() is not StepStatus.FAILED:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
            t.saw_two_failed.append(name)
            await asyncio.sleep(t.hold)
        except asyncio.CancelledError:
            t.cancelled.append(name)
            raise
        t.finished.append(name)
        return x

    @step
    async def one() -> int:
        t.started.append("one")
        return 1

    @step
    async def two(x: int) -> int:
        t.started.append("two")
        if two_waits:
            async with asyncio.timeout(5):
                await t.sibling_started["three"].wait()
                await t.sibling_started["four"].wait()
        raise t.error

    @step
    async def three(x: int) -> int:
        return await sibling("three", x)

    @step
    async def four(x: int) -> int:
        return await sibling("four", x)

    def leaf(name: str) -> Any:
        async def body(x: int) -> int:
            t.started.append(name)
            t.finished.append(name)
            return x

        body.__name__ = name
        return step(body)

    five, six, seven = leaf("five"), leaf("six"), leaf("seven")

    @step
    async def eight(a: int, b: int, c: int) -> int:
        t.started.append("eight")
        return a + b + c

    @pipeline(enable_cache=False, **options)
    def table() -> None:
        x = one()
        eight(five(two(x)), six(three(x)), seven(four(x)))

    return table, t


def build_sync(hold: float, **options: Any) -> tuple[Pipeline, Table]:
    """The table with plain `def` steps (each runs in a worker thread)."""
    t = Table(hold=hold)
    t.thread_started = {"three": threading.Event(), "four": threading.Event()}
    lock = threading.Lock()

    def note(where: list[str], name: str) -> None:
        with lock:
            where.append(name)

    def sibling(name: str, x: int) -> int:
        note(t.started, name)
        t.thread_started[name].set()
        deadline = time.monotonic() + 5
        while _two_status() is not StepStatus.FAILED and time.monotonic() < deadline:
            time.sleep(0.005)
        if _two_status() is StepStatus.FAILED:
            note(t.saw_two_failed, name)
        # A blocking wait, released by the test (or after `hold` seconds).
        t.release.wait(t.hold)
        note(t.finished, name)
        return x

    @step
    def one() -> int:
        note(t.started, "one")
        return 1

    @step
    def two(x: int) -> int:
        note(t.started, "two")
        assert t.thread_started["three"].wait(5)
        assert t.thread_started["four"].wait(5)
        raise t.error

    @step
    def three(x: int) -> int:
        return sibling("three", x)

    @step
    def four(x: int) -> int:
        return sibling("four", x)

    def leaf(name: str) -> Any:
        def body(x: int) -> int:
            note(t.started, name)
            note(t.finished, name)
            return x

        body.__name__ = name
        return step(body)

    five, six, seven = leaf("five"), leaf("six"), leaf("seven")

    @step
    def eight(a: int, b: int, c: int) -> int:
        note(t.started, "eight")
        return a + b + c

    @pipeline(enable_cache=False, **options)
    def table() -> None:
        x = one()
        eight(five(two(x)), six(three(x)), seven(four(x)))

    return table, t


def hold_for(mode: ExecutionMode) -> float:
    """FAIL_FAST siblings would run 10 s; in the other modes they finish soon after the failure."""
    return 10.0 if mode is ExecutionMode.FAIL_FAST else 0.05


async def run_expecting_failure(p: Pipeline) -> tuple[PipelineRun, RunFailedError, float]:
    """Run `p`, expect RunFailedError, return its run, the error and the elapsed seconds."""
    begin = time.monotonic()
    with pytest.raises(RunFailedError) as info:
        await p.run()
    elapsed = time.monotonic() - begin
    run = info.value.run
    assert isinstance(run, PipelineRun)
    return run, info.value, elapsed


def statuses(run: PipelineRun) -> dict[str, StepStatus]:
    """Invocation ID -> status."""
    return {name: sr.status for name, sr in run.steps.items()}


def check_table(mode: ExecutionMode, run: PipelineRun, err: RunFailedError, t: Table) -> None:
    """The statuses, run status, error chaining and which bodies ran, for `mode`."""
    assert statuses(run) == EXPECTED[mode]
    assert run.status is RunStatus.FAILED
    assert err.run is run
    assert err.__cause__ is t.error
    assert run.steps["two"].error is not None
    assert run.steps["two"].error.type == "StepTwoBroke"
    # 3 and 4 were genuinely running when step 2 failed.
    assert {"three", "four"} <= set(t.started)
    never = {"five", "eight"}
    if mode is not ExecutionMode.CONTINUE_ON_FAILURE:
        never |= {"six", "seven"}
    assert not never & set(t.started), f"{mode}: bodies started that must not: {t.started}"
    if mode is ExecutionMode.CONTINUE_ON_FAILURE:
        assert {"six", "seven"} <= set(t.finished)


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
async def test_table_async_steps(stack: Stack, mode: ExecutionMode) -> None:
    """Each execution mode gives the seed's table for async steps, in memory and in the store."""
    p, t = build_async(hold_for(mode), execution_mode=mode)
    run, err, elapsed = await run_expecting_failure(p)
    check_table(mode, run, err, t)
    if mode is ExecutionMode.FAIL_FAST:
        assert elapsed < 3, f"FAIL_FAST waited for its 10 s siblings ({elapsed:.1f} s)"
        assert sorted(t.cancelled) == ["four", "three"]
        assert not {"three", "four"} & set(t.finished)
    else:
        assert sorted(t.saw_two_failed) == ["four", "three"]
        assert t.cancelled == []
    stored = await AsyncClient().get_pipeline_run(run.name)
    assert stored.status is RunStatus.FAILED
    assert statuses(stored) == EXPECTED[mode]


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
async def test_table_sync_steps(stack: Stack, mode: ExecutionMode) -> None:
    """Each execution mode gives the seed's table when every step is a plain `def` step."""
    p, t = build_sync(hold_for(mode), execution_mode=mode)
    try:
        run, err, elapsed = await run_expecting_failure(p)
        finished_at_return = set(t.finished)
    finally:
        t.release.set()
    check_table(mode, run, err, t)
    if mode is ExecutionMode.FAIL_FAST:
        # The worker threads cannot be interrupted, but the run must not wait for them.
        assert elapsed < 3, f"FAIL_FAST waited for its blocked sync siblings ({elapsed:.1f} s)"
        assert not {"three", "four"} & finished_at_return
    else:
        assert sorted(t.saw_two_failed) == ["four", "three"]
        assert {"three", "four"} <= finished_at_return
    stored = await AsyncClient().get_pipeline_run(run.name)
    assert statuses(stored) == EXPECTED[mode]


async def test_default_mode_is_continue_on_failure(stack: Stack) -> None:
    """Without an execution_mode the table comes out as CONTINUE_ON_FAILURE."""
    p, t = build_async(hold_for(ExecutionMode.CONTINUE_ON_FAILURE))
    run, err, _ = await run_expecting_failure(p)
    check_table(ExecutionMode.CONTINUE_ON_FAILURE, run, err, t)


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
async def test_mode_as_string_via_configure(memory_stack: Stack, mode: ExecutionMode) -> None:
    """configure(execution_mode=<the enum's string value>) selects that mode."""
    p, t = build_async(hold_for(mode))
    assert p.configure(execution_mode=mode.value) is p
    run, err, _ = await run_expecting_failure(p)
    check_table(mode, run, err, t)


@pytest.mark.parametrize("mode", ALL_MODES, ids=lambda m: m.value)
async def test_mode_as_string_via_with_options(memory_stack: Stack, mode: ExecutionMode) -> None:
    """with_options(execution_mode=<string>) selects that mode on the copy only."""
    other = next(m for m in ALL_MODES if m is not mode)
    p, t = build_async(hold_for(mode), execution_mode=other)
    run, err, _ = await run_expecting_failure(p.with_options(execution_mode=mode.value))
    check_table(mode, run, err, t)


async def test_with_options_beats_configure(memory_stack: Stack) -> None:
    """A with_options() execution mode overrides one set by configure()."""
    p, t = build_async(hold_for(ExecutionMode.STOP_ON_FAILURE))
    p.configure(execution_mode=ExecutionMode.CONTINUE_ON_FAILURE)
    run, err, _ = await run_expecting_failure(
        p.with_options(execution_mode="stop_on_failure")
    )
    check_table(ExecutionMode.STOP_ON_FAILURE, run, err, t)


async def test_unknown_mode_string_is_rejected_before_running(memory_stack: Stack) -> None:
    """An execution_mode string that is no mode is a ConfigError and no step body runs."""
    p, t = build_async(0.0)
    with pytest.raises(ConfigError, match="execution_mode"):
        await p.with_options(execution_mode="fail_slowly").run()
    assert t.started == []


async def test_fail_fast_first_error_wins_and_run_is_failed_not_stopped(memory_stack: Stack) -> None:
    """Under FAIL_FAST the stopped siblings do not turn the run STOPPED: it is FAILED."""
    p, _ = build_async(10.0, execution_mode=ExecutionMode.FAIL_FAST)
    run, _, _ = await run_expecting_failure(p)
    assert run.status is RunStatus.FAILED
    assert run.end_time is not None
    for name in ("three", "four"):
        sr = run.steps[name]
        assert sr.end_time is not None and sr.start_time is not None


# -- step 2 fails at once, before 3 and 4 (launched with it) have begun ---------------------


async def test_fail_fast_immediate_failure_does_not_hang(memory_stack: Stack) -> None:
    """FAIL_FAST with step 2 failing before 3 and 4 begin ends promptly; 3 and 4 never run."""
    p, t = build_async(10.0, two_waits=False, execution_mode=ExecutionMode.FAIL_FAST)
    with pytest.raises(RunFailedError) as info:
        await asyncio.wait_for(p.run(), 3)
    run = info.value.run
    assert run.status is RunStatus.FAILED
    assert run.steps["two"].status is F
    assert {"three", "four"}.isdisjoint(t.finished)
    for name in ("three", "four"):
        assert run.steps[name].status in (S, X)
    for name in ("five", "six", "seven", "eight"):
        assert run.steps[name].status is S


async def test_stop_on_failure_immediate_failure_starts_no_sibling(memory_stack: Stack) -> None:
    """STOP_ON_FAILURE with step 2 failing before 3 and 4 begin starts neither of them."""
    p, t = build_async(0.05, two_waits=False, execution_mode=ExecutionMode.STOP_ON_FAILURE)
    with pytest.raises(RunFailedError) as info:
        await asyncio.wait_for(p.run(), 3)
    run = info.value.run
    assert t.started == ["one", "two"]
    assert run.steps["three"].status is S
    assert run.steps["four"].status is S


def test_sync_call_returns_at_once_when_fail_fast_abandons_sync_bodies(memory_stack: Stack) -> None:
    """A plain `p()` with FAIL_FAST returns right after the failure even though a sibling sync
    body still sleeps in its worker thread (flowcore's threads are not joined by the loop)."""
    import time as _time

    release = threading.Event()

    @step(enable_cache=False)
    def sleeper() -> None:
        release.wait(20)

    @step(enable_cache=False)
    def failing() -> None:
        _time.sleep(0.2)
        raise RuntimeError("boom")

    @pipeline(execution_mode=ExecutionMode.FAIL_FAST)
    def abandon() -> None:
        sleeper()
        failing()

    started = _time.monotonic()
    try:
        with pytest.raises(RunFailedError) as info:
            abandon()
        elapsed = _time.monotonic() - started
    finally:
        release.set()
    assert elapsed < 10, elapsed
    assert info.value.run is not None
    assert info.value.run.steps["sleeper"].status is StepStatus.STOPPED
