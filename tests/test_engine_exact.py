"""Exactness of the engine at its edges: Ctrl-C, runs cancelled before they start, the
lifecycle's one-way statuses, and the documented import edges."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flowcore import (
    AsyncClient,
    Client,
    RunStatus,
    Stack,
    StepStatus,
    pipeline,
    step,
)
from flowcore._engine._lifecycle import Lifecycle
from flowcore._models import PipelineRun, StepRun, StepRunConfig
from flowcore.stores._memory import InMemoryMetadataStore

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from flowcore import pipeline, step

    @step
    def slow() -> int:
        print("body started", flush=True)
        sys.__stdout__.write("BODY-STARTED\\n"); sys.__stdout__.flush()
        time.sleep(20)
        return 1

    @step
    def after(x: int) -> int:
        return x

    @pipeline(run_name="ctrl_c_run")
    def p() -> None:
        after(slow())

    try:
        p()
    except KeyboardInterrupt:
        sys.__stdout__.write("INTERRUPTED\\n"); sys.__stdout__.flush()
        raise
    """
)


def test_ctrl_c_during_plain_call_stops_the_run_and_exits_at_once(tmp_path: Path) -> None:
    """Ctrl-C during `p()` with a 20 s sync body: the run is STOPPED and the process exits in
    a few seconds, without waiting for the abandoned body (API.md §13.5)."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "FLOWCORE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if "BODY-STARTED" in line:
            break
        assert time.monotonic() < deadline, "the step never started"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        rest, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process waited for the abandoned sync body after Ctrl-C")
    took = time.monotonic() - sent
    assert "INTERRUPTED" in rest, err
    assert proc.returncode != 0
    assert took < 10, f"exit took {took:.1f} s after Ctrl-C"
    run = Client(Stack.local(tmp_path / "home")).get_pipeline_run("ctrl_c_run")
    assert run.status is RunStatus.STOPPED
    assert run.steps["slow"].status is StepStatus.STOPPED
    assert run.steps["after"].status is StepStatus.SKIPPED


@step
async def long_async() -> int:
    await asyncio.sleep(5)
    return 1


@pipeline
def one_long() -> None:
    long_async()


async def test_background_run_cancelled_before_it_began_is_stored_stopped(tmp_path: Path) -> None:
    """A submitted run cancelled before its task first ran is recorded STOPPED with its steps
    SKIPPED, so the store agrees with the handle."""
    stack = Stack.local(tmp_path)
    handle = one_long.with_options(stack=stack).submit()
    run = await handle.cancel()  # no await between submit and cancel: the task never ran
    assert run.status is RunStatus.STOPPED
    stored = await AsyncClient(stack).get_pipeline_run(handle.run_name)
    assert stored.status is RunStatus.STOPPED
    assert stored.steps["long_async"].status is StepStatus.SKIPPED
    await stack.close()


async def test_awaiting_a_handle_cancelled_before_it_began_returns_the_stopped_run() -> None:
    """`await handle` after an unstarted run was cancelled from elsewhere returns it STOPPED."""
    stack = Stack.in_memory()
    handle = one_long.with_options(stack=stack).submit()
    handle._task.cancel()  # type: ignore[union-attr]  # a cancel by someone else
    run = await handle
    assert run.status is RunStatus.STOPPED
    assert run.steps["long_async"].status is StepStatus.SKIPPED


def _one_step_lifecycle() -> tuple[Lifecycle, StepRun]:
    run = PipelineRun(id="r", name="r", pipeline_name="p", start_time=datetime.now(UTC))
    sr = StepRun(id="s", name="s", step_name="s", pipeline_run_id="r", config=StepRunConfig())
    run.steps["s"] = sr
    return Lifecycle(run, InMemoryMetadataStore()), sr


def test_lifecycle_never_changes_a_terminal_status() -> None:
    """Once a step run is terminal, every later transition is refused and records nothing."""
    life, sr = _one_step_lifecycle()
    assert life.step_running(sr, 1)
    assert life.step_failed(sr, ValueError("boom"))
    end = sr.end_time
    assert not life.step_completed(sr, {}, None)
    assert not life.step_stopped(sr)
    assert not life.step_running(sr, 2)
    assert not life.step_retrying(sr, 2, ValueError("again"), 0.0)
    assert not life.step_cached(sr, {}, "other")
    life.steps_skipped([sr])
    assert sr.status is StepStatus.FAILED
    assert sr.end_time == end
    assert sr.attempts == 1


def test_a_step_that_never_began_is_skipped_not_stopped() -> None:
    """`step_stopped` on a PENDING step run records SKIPPED: nothing of it ran."""
    life, sr = _one_step_lifecycle()
    assert life.step_stopped(sr)
    assert sr.status is StepStatus.SKIPPED
