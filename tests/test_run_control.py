"""Controlling runs (API.md §14-16): resuming a run, run deadlines, and pools shared by every
run on a stack."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from flowcore import (
    AsyncClient,
    ConfigError,
    RunFailedError,
    RunStateError,
    RunStatus,
    RunTimeoutError,
    Stack,
    StepStatus,
    pipeline,
    step,
)


@pytest.fixture(params=["memory", "local"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Stack:
    """Both stacks a user has."""
    return Stack.in_memory() if request.param == "memory" else Stack.local(tmp_path)


# -- resume ----------------------------------------------------------------------------------

CALLS: list[str] = []
FAIL = {"flaky": True}


@step(enable_cache=False)
def load(n: int) -> list[int]:
    CALLS.append("load")
    return list(range(n))


@step(enable_cache=False)
def flaky(xs: list[int]) -> int:
    CALLS.append("flaky")
    if FAIL["flaky"]:
        raise ValueError("flaky failed")
    return sum(xs)


@step(enable_cache=False)
def report(total: int) -> str:
    CALLS.append("report")
    return f"total={total}"


@step(enable_cache=False)
def side(xs: list[int]) -> int:
    CALLS.append("side")
    return len(xs)


@pipeline
def resumable(n: int = 4) -> None:
    xs = load(n)
    report(flaky(xs))
    side(xs)


async def test_resume_reuses_what_completed_and_runs_the_rest(stack: Stack) -> None:
    """A resumed run reuses completed steps (CACHED, original outputs, bodies not run) and
    runs the failed step and everything downstream of it, with the original parameters."""
    CALLS.clear()
    FAIL["flaky"] = True
    p = resumable.with_options(stack=stack)
    with pytest.raises(RunFailedError) as failed:
        await p.run(n=5)
    original = failed.value.run
    FAIL["flaky"] = False
    CALLS.clear()
    run = await resumable.with_options(stack=stack, resume_from=original.name).run()
    assert run.status is RunStatus.COMPLETED
    assert run.name != original.name
    assert run.resumed_from == original.id
    assert CALLS == ["flaky", "report"]
    assert run.steps["load"].status is StepStatus.CACHED
    assert run.steps["side"].status is StepStatus.CACHED
    assert run.steps["load"].outputs["output"].id == original.steps["load"].outputs["output"].id
    assert run.steps["report"].output.load() == "total=10"  # n=5 came from the original
    # A resumed run can itself be resumed, and so can the original, any number of times.
    again = await resumable.with_options(stack=stack, resume_from=original).run()
    assert again.steps["flaky"].status is StepStatus.COMPLETED


async def test_a_resumed_run_records_its_origin_and_source(stack: Stack) -> None:
    """The stored run says which run it resumed and where its pipeline is defined."""
    FAIL["flaky"] = True
    with pytest.raises(RunFailedError) as failed:
        await resumable.with_options(stack=stack).run(n=2)
    FAIL["flaky"] = False
    run = await resumable.with_options(stack=stack, resume_from=failed.value.run).run()
    stored = await AsyncClient(stack).get_pipeline_run(run.name)
    assert stored.resumed_from == failed.value.run.id
    assert stored.source == f"{__name__}:resumable"
    assert stored.steps["load"].status is StepStatus.CACHED


async def test_resume_with_changed_parameters_reruns_what_depends_on_them(stack: Stack) -> None:
    """Passing other parameters reruns the steps whose parameters changed and their
    downstream steps."""
    CALLS.clear()
    FAIL["flaky"] = False
    first = await resumable.with_options(stack=stack).run(n=3)
    CALLS.clear()
    run = await resumable.with_options(stack=stack, resume_from=first.name).run(n=4)
    assert sorted(CALLS) == ["flaky", "load", "report", "side"]
    assert run.steps["report"].output.load() == "total=6"


@step(enable_cache=False)
async def forever() -> None:
    await asyncio.sleep(30)


@pipeline
def endless() -> None:
    forever()


async def test_resuming_a_live_run_is_a_run_state_error(stack: Stack) -> None:
    """A run still RUNNING in a live process cannot be resumed."""
    handle = endless.with_options(stack=stack).submit()
    await asyncio.sleep(0.2)
    with pytest.raises(RunStateError, match=handle.run_name):
        await endless.with_options(stack=stack, resume_from=handle.run_name).run()
    await handle.cancel()


# -- deadlines -------------------------------------------------------------------------------


async def test_a_run_deadline_stops_the_run_and_fails_it(stack: Stack) -> None:
    """At the deadline the run is cancelled like FAIL_FAST and ends FAILED, with a
    RunTimeoutError as the cause."""
    started = time.monotonic()
    with pytest.raises(RunFailedError) as failed:
        await endless.with_options(stack=stack, timeout=0.3).run()
    assert time.monotonic() - started < 5
    assert isinstance(failed.value.__cause__, RunTimeoutError)
    run = failed.value.run
    assert run.status is RunStatus.FAILED
    assert run.steps["forever"].status is StepStatus.STOPPED
    stored = await AsyncClient(stack).get_pipeline_run(run.name)
    assert stored.status is RunStatus.FAILED


def test_a_run_deadline_from_yaml_and_bad_values(tmp_path: Path) -> None:
    """`timeout:` in a YAML run config sets the deadline; a bad value is a ConfigError."""
    config = tmp_path / "run.yaml"
    config.write_text("timeout: 0.2\n")
    with pytest.raises(RunFailedError) as failed:
        endless.with_options(stack=Stack.in_memory(), config_path=str(config))()
    assert isinstance(failed.value.__cause__, RunTimeoutError)
    with pytest.raises(ConfigError, match="timeout"):
        endless.with_options(timeout=-1)
    with pytest.raises(ConfigError, match="timeout"):
        pipeline(timeout="soon")(lambda: None)


# -- pools -----------------------------------------------------------------------------------

ACTIVE = {"now": 0, "max": 0}
LOCK = threading.Lock()


@step(enable_cache=False, pool="gpu")
def on_gpu(i: int) -> int:
    with LOCK:
        ACTIVE["now"] += 1
        ACTIVE["max"] = max(ACTIVE["max"], ACTIVE["now"])
    time.sleep(0.1)
    with LOCK:
        ACTIVE["now"] -= 1
    return i


@pipeline
def uses_gpu(n: int = 4) -> None:
    for i in range(n):
        on_gpu(i)


async def test_a_pool_limits_bodies_across_runs(stack: Stack) -> None:
    """With gpu=1, bodies holding the pool never overlap, across concurrent runs; waiting is
    recorded as StepRun.waited."""
    ACTIVE.update(now=0, max=0)
    pooled = stack.with_pools(gpu=1)
    p = uses_gpu.with_options(stack=pooled)
    runs = await asyncio.gather(p.run(n=3), p.run(n=3))
    assert ACTIVE["max"] == 1
    waited = [s.waited for r in runs for s in r.steps.values()]
    assert max(waited) > 0.2
    assert all(r.status is RunStatus.COMPLETED for r in runs)


async def test_a_pool_the_stack_lacks_is_a_config_error_before_the_run(stack: Stack) -> None:
    """A step naming a pool its stack does not have fails before any run is recorded."""
    with pytest.raises(ConfigError, match="gpu"):
        await uses_gpu.with_options(stack=stack).run()
    assert await AsyncClient(stack).list_pipeline_runs() == []


def test_pool_limits_are_validated() -> None:
    """Pool limits must be whole numbers >= 1; YAML `pools:` builds the same stack."""
    with pytest.raises(ConfigError):
        Stack.in_memory().with_pools(gpu=0)
    with pytest.raises(ConfigError):
        Stack.in_memory().with_pools(gpu="one")  # type: ignore[arg-type]


def test_stack_yaml_pools(tmp_path: Path) -> None:
    """`pools: {gpu: 2}` in a stack file gives the stack that pool."""
    (tmp_path / "stack.yaml").write_text("metadata_store: memory\npools: {gpu: 2}\n")
    stack = Stack.from_yaml(tmp_path / "stack.yaml")
    assert stack.pools.limits == {"gpu": 2}
