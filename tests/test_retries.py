"""Step retries (API.md section 4, fine points 7 and 8): delays, attempts, filters, timeouts,
cancellation and hooks, with a FakeClock so no delay sleeps for real."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowcore.config
from flowcore import (
    AsyncClient,
    ExecutionMode,
    RunFailedError,
    RunHandle,
    RunStatus,
    Stack,
    StepRetryConfig,
    StepStatus,
    StepTimeoutError,
    get_step_context,
    pipeline,
    step,
)
from flowcore._retry import retry_delay
from flowcore.testing import FakeClock


class Flaky(Exception):
    """What the failing steps in this module raise."""


def one_step_pipeline(s: Any, **options: Any) -> Any:
    """A pipeline made of the single step `s` (no cache)."""

    @pipeline(enable_cache=False, **options)
    def single() -> None:
        s()

    return single


def failing_until(n_ok: int | None, calls: list[int], *, sync: bool = False) -> Any:
    """A step body raising Flaky on every attempt before attempt `n_ok` (never if None)."""

    def check() -> int:
        attempt = get_step_context().step_run.attempt
        calls.append(attempt)
        if n_ok is None or attempt < n_ok:
            raise Flaky(f"attempt {attempt}")
        return attempt

    if sync:

        def flaky_sync() -> int:
            return check()

        return flaky_sync

    async def flaky() -> int:
        return check()

    return flaky


# -- delays --------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_seed_example_sleeps_10_20_40_then_fails(stack: Stack, sync: bool) -> None:
    """max_retries=3, delay=10, backoff=2 waits exactly 10, 20, 40 s and then fails (4 attempts)."""
    calls: list[int] = []
    s = step(retry=StepRetryConfig(max_retries=3, delay=10, backoff=2))(
        failing_until(None, calls, sync=sync))
    clock = FakeClock()
    with pytest.raises(RunFailedError) as info:
        await one_step_pipeline(s).with_options(clock=clock).run()
    assert clock.sleeps == [10, 20, 40]
    run = info.value.run
    sr = run.steps[s.name]
    assert sr.status is StepStatus.FAILED
    assert sr.attempts == 4
    assert calls == [1, 2, 3, 4]
    assert run.status is RunStatus.FAILED
    # The error the run reports is the last attempt's.
    assert isinstance(info.value.__cause__, Flaky)
    assert str(info.value.__cause__) == "attempt 4"
    stored = await AsyncClient().get_pipeline_run(run.name)
    assert stored.steps[s.name].status is StepStatus.FAILED
    assert stored.steps[s.name].attempts == 4


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_success_on_third_attempt(stack: Stack, sync: bool) -> None:
    """A step that succeeds on attempt 3 is COMPLETED with attempts == 3 and saw attempts 1, 2, 3."""
    calls: list[int] = []
    s = step(retry=StepRetryConfig(max_retries=3, delay=10, backoff=2))(
        failing_until(3, calls, sync=sync))
    clock = FakeClock()
    run = await one_step_pipeline(s).with_options(clock=clock).run()
    sr = run.steps[s.name]
    assert sr.status is StepStatus.COMPLETED
    assert run.status is RunStatus.COMPLETED
    assert sr.attempts == 3
    assert calls == [1, 2, 3]
    assert clock.sleeps == [10, 20]
    assert sr.output.load() == 3
    stored = await AsyncClient().get_pipeline_run(run.name)
    assert stored.steps[s.name].attempts == 3
    assert stored.steps[s.name].status is StepStatus.COMPLETED


async def test_no_retry_config_means_one_attempt(memory_stack: Stack) -> None:
    """Without any retry configuration a failing step is tried exactly once."""
    calls: list[int] = []
    s = step(failing_until(None, calls))
    clock = FakeClock()
    with pytest.raises(RunFailedError) as info:
        await one_step_pipeline(s).with_options(clock=clock).run()
    assert calls == [1]
    assert clock.sleeps == []
    assert info.value.run.steps[s.name].attempts == 1


async def test_zero_delay_does_not_wait(memory_stack: Stack) -> None:
    """The default delay of 0 retries without waiting on the clock for a positive time."""
    calls: list[int] = []
    s = step(retry=StepRetryConfig(max_retries=2))(failing_until(None, calls))
    clock = FakeClock()
    with pytest.raises(RunFailedError):
        await one_step_pipeline(s).with_options(clock=clock).run()
    assert calls == [1, 2, 3]
    assert all(d == 0 for d in clock.sleeps)


async def test_max_delay_caps_each_wait(memory_stack: Stack) -> None:
    """max_delay caps the exponential delays: 10, 30, 50, 50 for delay 10, backoff 3, cap 50."""
    calls: list[int] = []
    s = step(retry=StepRetryConfig(max_retries=4, delay=10, backoff=3, max_delay=50))(
        failing_until(None, calls))
    clock = FakeClock()
    with pytest.raises(RunFailedError):
        await one_step_pipeline(s).with_options(clock=clock).run()
    assert clock.sleeps == [10, 30, 50, 50]
    assert calls == [1, 2, 3, 4, 5]


def test_retry_delay_pure_function_seed_example() -> None:
    """retry_delay gives delay * backoff**(k-1) for k = 1, 2, 3 and honours max_delay."""
    policy = StepRetryConfig(max_retries=3, delay=10, backoff=2)
    assert [retry_delay(policy, k) for k in (1, 2, 3)] == [10, 20, 40]
    capped = StepRetryConfig(max_retries=5, delay=1, backoff=10, max_delay=50)
    assert [retry_delay(capped, k) for k in (1, 2, 3, 4)] == [1, 10, 50, 50]


@given(
    delay=st.floats(min_value=0, max_value=100),
    backoff=st.floats(min_value=0, max_value=5),
    max_delay=st.none() | st.floats(min_value=0, max_value=500),
    jitter=st.floats(min_value=0, max_value=2),
    k=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_retry_delay_jitter_within_bounds(
    delay: float, backoff: float, max_delay: float | None, jitter: float, k: int, seed: int,
) -> None:
    """With jitter j the delay lies in [base, base * (1 + j)], base the capped exponential delay."""
    policy = StepRetryConfig(max_retries=k, delay=delay, backoff=backoff, max_delay=max_delay,
                             jitter=jitter)
    base = delay * backoff ** (k - 1)
    if max_delay is not None:
        base = min(base, max_delay)
    got = retry_delay(policy, k, random.Random(seed))
    assert base * (1 - 1e-9) <= got <= base * (1 + jitter) * (1 + 1e-9) + 1e-12


def test_retry_delay_jitter_actually_varies() -> None:
    """Jitter is random: many draws are not all equal and spread over the allowed range."""
    policy = StepRetryConfig(max_retries=1, delay=10, jitter=0.5)
    rng = random.Random(1234)
    draws = [retry_delay(policy, 1, rng) for _ in range(200)]
    assert all(10 <= d <= 15 for d in draws)
    assert max(draws) - min(draws) > 2.5


async def test_jitter_via_runner_within_bounds(memory_stack: Stack) -> None:
    """The runner's waits with jitter 0.5 lie within [10, 15], [20, 30], [40, 60]."""
    calls: list[int] = []
    s = step(retry=StepRetryConfig(max_retries=3, delay=10, backoff=2, jitter=0.5))(
        failing_until(None, calls))
    clock = FakeClock()
    with pytest.raises(RunFailedError):
        await one_step_pipeline(s).with_options(clock=clock).run()
    assert len(clock.sleeps) == 3
    for got, base in zip(clock.sleeps, (10, 20, 40), strict=True):
        assert base <= got <= base * 1.5


# -- what is retried -----------------------------------------------------------------------


async def test_retry_on_filters_non_matching_exception(memory_stack: Stack) -> None:
    """An exception outside retry_on is not retried: one attempt, no wait, FAILED."""
    calls: list[int] = []
    s = step(retry=StepRetryConfig(max_retries=3, delay=1, retry_on=(ConnectionError,)))(
        failing_until(None, calls))
    clock = FakeClock()
    with pytest.raises(RunFailedError) as info:
        await one_step_pipeline(s).with_options(clock=clock).run()
    assert calls == [1]
    assert clock.sleeps == []
    sr = info.value.run.steps[s.name]
    assert sr.status is StepStatus.FAILED
    assert sr.attempts == 1


async def test_retry_on_matching_exception_subclass_is_retried(memory_stack: Stack) -> None:
    """An exception that is an instance of a retry_on type (a subclass) is retried."""
    attempts: list[int] = []

    @step(retry=StepRetryConfig(max_retries=2, delay=1, retry_on=OSError))
    async def connect() -> str:
        attempts.append(get_step_context().step_run.attempt)
        if len(attempts) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    clock = FakeClock()
    run = await one_step_pipeline(connect).with_options(clock=clock).run()
    assert attempts == [1, 2, 3]
    assert clock.sleeps == [1, 1]
    assert run.steps["connect"].status is StepStatus.COMPLETED


async def test_timeout_raises_step_timeout_error_after_last_attempt(memory_stack: Stack) -> None:
    """A step that always times out is retried, then fails with StepTimeoutError as the cause."""
    attempts: list[int] = []

    @step(timeout=0.05, retry=StepRetryConfig(max_retries=2, delay=7))
    async def slow() -> int:
        attempts.append(get_step_context().step_run.attempt)
        await asyncio.sleep(10)
        return 1

    clock = FakeClock()
    with pytest.raises(RunFailedError) as info:
        await one_step_pipeline(slow).with_options(clock=clock).run()
    assert isinstance(info.value.__cause__, StepTimeoutError)
    assert "slow" in str(info.value.__cause__)
    assert attempts == [1, 2, 3]
    assert clock.sleeps == [7, 7]
    sr = info.value.run.steps["slow"]
    assert sr.status is StepStatus.FAILED
    assert sr.attempts == 3
    assert sr.error is not None and sr.error.type == "StepTimeoutError"


async def test_timeout_is_retried_and_can_then_succeed(memory_stack: Stack) -> None:
    """A first attempt that times out is retried; a quick second attempt completes the step."""
    attempts: list[int] = []

    @step(timeout=0.05, retry=StepRetryConfig(max_retries=1, delay=3))
    async def sometimes_slow() -> int:
        attempt = get_step_context().step_run.attempt
        attempts.append(attempt)
        if attempt == 1:
            await asyncio.sleep(10)
        return attempt

    clock = FakeClock()
    run = await one_step_pipeline(sometimes_slow).with_options(clock=clock).run()
    sr = run.steps["sometimes_slow"]
    assert sr.status is StepStatus.COMPLETED
    assert sr.attempts == 2
    assert attempts == [1, 2]
    assert clock.sleeps == [3]
    assert sr.output.load() == 2


async def test_timeout_without_retry_fails_at_once(memory_stack: Stack) -> None:
    """A timeout with no retry configured fails the step after one attempt with StepTimeoutError."""

    @step(timeout=0.05)
    async def stuck() -> None:
        await asyncio.sleep(10)

    with pytest.raises(RunFailedError) as info:
        await one_step_pipeline(stuck).run()
    assert isinstance(info.value.__cause__, StepTimeoutError)
    assert info.value.run.steps["stuck"].attempts == 1


async def test_fail_fast_cancelled_sibling_is_never_retried(memory_stack: Stack) -> None:
    """A step with retries cancelled by a FAIL_FAST sibling is STOPPED after one attempt, no hooks."""
    started = asyncio.Event()
    calls: list[int] = []
    saw_cancel: list[bool] = []

    hooks: list[str] = []

    @step(retry=StepRetryConfig(max_retries=3, delay=1),
          on_failure=lambda: hooks.append("failure"), on_end=lambda: hooks.append("end"))
    async def patient() -> int:
        calls.append(get_step_context().step_run.attempt)
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            saw_cancel.append(True)
            raise
        return 1

    @step
    async def breaker() -> None:
        await asyncio.wait_for(started.wait(), 5)
        raise Flaky("boom")

    @pipeline(enable_cache=False, execution_mode=ExecutionMode.FAIL_FAST)
    def pair() -> None:
        patient()
        breaker()

    clock = FakeClock()
    with pytest.raises(RunFailedError) as info:
        await pair.with_options(clock=clock).run()
    sr = info.value.run.steps["patient"]
    assert sr.status is StepStatus.STOPPED
    assert sr.attempts == 1
    assert calls == [1]
    assert saw_cancel == [True]
    assert clock.sleeps == []
    assert hooks == []  # stopped steps run no hooks


async def test_cancelled_run_does_not_retry_the_running_step(memory_stack: Stack) -> None:
    """Cancelling a background run stops a step with retries without trying it again."""
    started = asyncio.Event()
    calls: list[int] = []

    @step(retry=StepRetryConfig(max_retries=3))
    async def long_one() -> None:
        calls.append(get_step_context().step_run.attempt)
        started.set()
        await asyncio.sleep(10)

    clock = FakeClock()
    handle = one_step_pipeline(long_one).with_options(clock=clock).submit()
    await asyncio.wait_for(started.wait(), 5)
    run = await handle.cancel()
    assert run.status is RunStatus.STOPPED
    assert run.steps["long_one"].status is StepStatus.STOPPED
    assert run.steps["long_one"].attempts == 1
    assert calls == [1]
    assert clock.sleeps == []


async def test_cancel_while_waiting_to_retry_stops_the_step(memory_stack: Stack) -> None:
    """Cancelling a run while a step waits for its retry stops it: no further attempt, no hooks."""
    calls: list[int] = []
    hooks: list[str] = []
    waiting = asyncio.Event()

    class BlockingClock(FakeClock):
        async def sleep(self, seconds: float) -> None:
            self.sleeps.append(seconds)
            waiting.set()
            await asyncio.sleep(10)

    s = step(retry=StepRetryConfig(max_retries=3, delay=5),
             on_failure=lambda: hooks.append("failure"),
             on_end=lambda: hooks.append("end"))(failing_until(None, calls))
    clock = BlockingClock()
    handle = one_step_pipeline(s).with_options(clock=clock).submit()
    await asyncio.wait_for(waiting.wait(), 5)
    assert handle.run.steps[s.name].status is StepStatus.RETRYING
    run = await handle.cancel()
    assert run.status is RunStatus.STOPPED
    assert run.steps[s.name].status is StepStatus.STOPPED
    assert calls == [1]
    assert clock.sleeps == [5]
    assert hooks == []


async def test_sync_step_timeout_is_retried(memory_stack: Stack) -> None:
    """A plain `def` step that overruns its timeout is retried and then fails with StepTimeoutError."""
    release = threading.Event()
    attempts: list[int] = []

    # Generous: the body must have started in its worker thread before the timeout expires,
    # even on a loaded machine.
    @step(timeout=0.5, retry=StepRetryConfig(max_retries=1, delay=2))
    def blocking() -> int:
        attempts.append(get_step_context().step_run.attempt)
        release.wait(10)
        return 1

    clock = FakeClock()
    try:
        with pytest.raises(RunFailedError) as info:
            await one_step_pipeline(blocking).with_options(clock=clock).run()
    finally:
        release.set()
    assert isinstance(info.value.__cause__, StepTimeoutError)
    assert attempts == [1, 2]
    assert clock.sleeps == [2]
    assert info.value.run.steps["blocking"].attempts == 2


# -- hooks ---------------------------------------------------------------------------------


async def test_hooks_across_attempts_on_failure(memory_stack: Stack) -> None:
    """on_start runs before every attempt; on_failure and on_end once, after the last attempt."""
    events: list[str] = []

    def on_start() -> None:
        events.append(f"start{get_step_context().step_run.attempt}")

    def on_failure(exception: BaseException) -> None:
        events.append(f"failure:{exception}")

    async def on_end(status: StepStatus) -> None:
        events.append(f"end:{status.value}")

    @step(retry=StepRetryConfig(max_retries=2, delay=1), on_start=on_start,
          on_failure=on_failure, on_end=on_end)
    async def doomed() -> None:
        attempt = get_step_context().step_run.attempt
        events.append(f"body{attempt}")
        raise Flaky(f"attempt {attempt}")

    with pytest.raises(RunFailedError):
        await one_step_pipeline(doomed).with_options(clock=FakeClock()).run()
    assert events == [
        "start1", "body1", "start2", "body2", "start3", "body3",
        "failure:attempt 3", "end:failed",
    ]


async def test_hooks_across_attempts_on_success(memory_stack: Stack) -> None:
    """A step succeeding on its second attempt runs on_start twice, on_success once, no on_failure."""
    events: list[str] = []

    def on_start() -> None:
        events.append(f"start{get_step_context().step_run.attempt}")

    def on_failure() -> None:
        events.append("failure")

    def on_success(step_output: Any) -> None:
        events.append(f"success:{step_output}")

    @step(retry=StepRetryConfig(max_retries=3), on_start=on_start, on_failure=on_failure,
          on_success=on_success)
    async def second_time_lucky() -> int:
        attempt = get_step_context().step_run.attempt
        events.append(f"body{attempt}")
        if attempt < 2:
            raise Flaky("not yet")
        return 42

    run = await one_step_pipeline(second_time_lucky).with_options(clock=FakeClock()).run()
    assert run.steps["second_time_lucky"].status is StepStatus.COMPLETED
    assert events == ["start1", "body1", "start2", "body2", "success:42"]


async def test_pipeline_level_failure_hook_runs_once_per_step(memory_stack: Stack) -> None:
    """A pipeline-level on_failure hook with a pipeline-level retry runs once, after the last try."""
    failures: list[tuple[str, str]] = []

    def on_failure(step_name: str, exception: BaseException) -> None:
        failures.append((step_name, str(exception)))

    calls: list[int] = []
    s = step(failing_until(None, calls))
    p = one_step_pipeline(s, retry=StepRetryConfig(max_retries=2), on_failure=on_failure)
    with pytest.raises(RunFailedError):
        await p.with_options(clock=FakeClock()).run()
    assert calls == [1, 2, 3]
    assert failures == [(s.name, "attempt 3")]


# -- pipeline-level vs step-level ----------------------------------------------------------


async def test_step_retry_replaces_pipeline_retry(memory_stack: Stack) -> None:
    """A step's own retry replaces the pipeline's (fine point 8); other steps use the pipeline's."""
    own_calls: list[int] = []
    inherit_calls: list[int] = []

    async def own() -> None:
        own_calls.append(get_step_context().step_run.attempt)
        raise Flaky("own")

    async def inherit() -> None:
        inherit_calls.append(get_step_context().step_run.attempt)
        raise Flaky("inherit")

    own_step = step(retry=StepRetryConfig(max_retries=1, delay=5))(own)
    inherit_step = step(inherit)

    @pipeline(enable_cache=False, retry=StepRetryConfig(max_retries=3, delay=1, backoff=1))
    def both() -> None:
        own_step()
        inherit_step()

    clock = FakeClock()
    with pytest.raises(RunFailedError) as info:
        await both.with_options(clock=clock).run()
    steps = info.value.run.steps
    assert own_calls == [1, 2]
    assert steps["own"].attempts == 2
    assert inherit_calls == [1, 2, 3, 4]
    assert steps["inherit"].attempts == 4
    assert sorted(clock.sleeps) == [1, 1, 1, 5]


async def test_step_retry_with_zero_retries_disables_pipeline_retry(memory_stack: Stack) -> None:
    """A step retry of max_retries=0 replaces a generous pipeline retry: one attempt only."""
    calls: list[int] = []
    s = step(retry=StepRetryConfig(max_retries=0))(failing_until(None, calls))
    p = one_step_pipeline(s, retry=StepRetryConfig(max_retries=5, delay=2))
    clock = FakeClock()
    with pytest.raises(RunFailedError):
        await p.with_options(clock=clock).run()
    assert calls == [1]
    assert clock.sleeps == []


async def test_step_retry_does_not_inherit_pipeline_fields(memory_stack: Stack) -> None:
    """The step's retry replaces the pipeline's whole: its own (default) delay, not the pipeline's."""
    calls: list[int] = []
    s = step(retry=StepRetryConfig(max_retries=2))(failing_until(None, calls))
    p = one_step_pipeline(s, retry=StepRetryConfig(max_retries=9, delay=30, backoff=3))
    clock = FakeClock()
    with pytest.raises(RunFailedError):
        await p.with_options(clock=clock).run()
    assert calls == [1, 2, 3]
    assert all(d == 0 for d in clock.sleeps)


async def test_pipeline_retry_via_with_options(memory_stack: Stack) -> None:
    """A retry given with with_options applies to steps without their own retry."""
    calls: list[int] = []
    s = step(failing_until(3, calls))
    clock = FakeClock()
    p = one_step_pipeline(s).with_options(
        retry=StepRetryConfig(max_retries=4, delay=2, backoff=2), clock=clock)
    run = await p.run()
    assert run.steps[s.name].attempts == 3
    assert clock.sleeps == [2, 4]


def test_retry_config_is_importable_from_config() -> None:
    """StepRetryConfig is the same class at flowcore and flowcore.config, with the API defaults."""
    assert flowcore.config.StepRetryConfig is StepRetryConfig
    cfg = StepRetryConfig()
    assert (cfg.max_retries, cfg.delay, cfg.backoff, cfg.max_delay, cfg.jitter) == (
        1, 0.0, 1.0, None, 0.0)
    assert cfg.retry_on == (Exception,)


# -- RETRYING is observable ----------------------------------------------------------------


class InspectingClock(FakeClock):
    """A FakeClock that, while the runner waits to retry, records what the world sees."""

    def __init__(self) -> None:
        super().__init__()
        self.handle: RunHandle | None = None
        self.seen: list[dict[str, Any]] = []

    async def sleep(self, seconds: float) -> None:
        ctx = get_step_context()
        assert self.handle is not None
        stored = await AsyncClient().get_pipeline_run(self.handle.run_name)
        self.seen.append({
            "context": ctx.step_run.status,
            "handle_step": self.handle.run.steps[ctx.step_run.name].status,
            "handle_run": self.handle.status,
            "stored_step": stored.steps[ctx.step_run.name].status,
            "stored_run": stored.status,
            "attempts": stored.steps[ctx.step_run.name].attempts,
        })
        await super().sleep(seconds)


async def test_retrying_status_is_observable_while_waiting(stack: Stack) -> None:
    """While a retry waits, the step is RETRYING on the handle, in its context and in the store."""
    calls: list[int] = []
    s = step(retry=StepRetryConfig(max_retries=2, delay=4))(failing_until(3, calls))
    clock = InspectingClock()
    handle = one_step_pipeline(s).with_options(clock=clock).submit()
    clock.handle = handle
    run = await handle
    assert run.steps[s.name].status is StepStatus.COMPLETED
    assert clock.sleeps == [4, 4]
    assert [x["attempts"] for x in clock.seen] == [1, 2]
    for seen in clock.seen:
        assert seen["context"] is StepStatus.RETRYING
        assert seen["handle_step"] is StepStatus.RETRYING
        assert seen["stored_step"] is StepStatus.RETRYING
        assert seen["handle_run"] is RunStatus.RUNNING
        assert seen["stored_run"] is RunStatus.RUNNING
