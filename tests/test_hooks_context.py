"""Hooks (injection, timing, precedence, failures) and the step context (API.md section 5)."""

import asyncio
import logging
import threading
from typing import TYPE_CHECKING

import pytest

from flowcore import (
    Client,
    ExecutionMode,
    RunFailedError,
    StepContextError,
    StepRetryConfig,
    StepStatus,
    get_step_context,
    pipeline,
    step,
)

if TYPE_CHECKING:  # only for string annotations that cannot be resolved at run time
    from decimal import Decimal

# -- injection --------------------------------------------------------------------------------


async def test_hook_without_parameters_is_called(memory_stack):
    """A hook taking no parameters is called."""
    fired: list[str] = []

    def hook():
        fired.append("success")

    @step(enable_cache=False, on_success=hook)
    def s() -> int:
        return 1

    @pipeline
    def p():
        s()

    await p.run()
    assert fired == ["success"]


async def test_failure_hook_gets_exception_by_annotation_under_any_name(memory_stack):
    """A parameter annotated BaseException (or a subclass) gets the exception, whatever its
    name."""
    got: dict[str, BaseException] = {}

    def base_hook(err: BaseException):
        got["base"] = err

    def sub_hook(problem: ValueError):
        got["sub"] = problem

    @step(enable_cache=False, on_failure=base_hook)
    def fails_a() -> None:
        raise ValueError("first boom")

    @step(enable_cache=False, on_failure=sub_hook)
    def fails_b() -> None:
        raise ValueError("second boom")

    @pipeline
    def p():
        fails_a()
        fails_b()

    with pytest.raises(RunFailedError):
        await p.run()
    assert isinstance(got["base"], ValueError) and str(got["base"]) == "first boom"
    assert isinstance(got["sub"], ValueError) and str(got["sub"]) == "second boom"


async def test_failure_hook_gets_exception_by_name(memory_stack):
    """An unannotated parameter named `exception` gets the exception."""
    got: list[BaseException] = []

    def hook(exception):
        got.append(exception)

    @step(enable_cache=False, on_failure=hook)
    def fails() -> None:
        raise KeyError("missing")

    @pipeline
    def p():
        fails()

    with pytest.raises(RunFailedError):
        await p.run()
    assert len(got) == 1 and isinstance(got[0], KeyError)


async def test_hook_gets_step_name_as_invocation_id(memory_stack):
    """`step_name` is the invocation ID, not the function name."""
    got: list[str] = []

    def hook(step_name):
        got.append(step_name)

    @step(enable_cache=False, on_success=hook)
    def s() -> int:
        return 1

    @pipeline
    def p():
        s(step_name="custom_id")
        s()
        s()

    await p.run()
    assert sorted(got) == ["custom_id", "s", "s_2"]


async def test_success_hook_gets_single_output_value(memory_stack):
    """`step_output` is the output value for a one-output step."""
    got: list[object] = []

    def hook(step_output):
        got.append(step_output)

    @step(enable_cache=False, on_success=hook)
    def s() -> dict:
        return {"acc": 0.5}

    @pipeline
    def p():
        s()

    await p.run()
    assert got == [{"acc": 0.5}]


async def test_success_hook_gets_tuple_for_several_outputs(memory_stack):
    """`step_output` is a tuple of the values for a multi-output step."""
    got: list[object] = []

    def hook(step_output):
        got.append(step_output)

    @step(enable_cache=False, on_success=hook)
    def s() -> tuple[int, str]:
        return 1, "two"

    @pipeline
    def p():
        s()

    await p.run()
    assert got == [(1, "two")]


async def test_success_hook_gets_none_output_for_no_output_step(memory_stack):
    """`step_output` is None for a step without outputs."""
    got: list[object] = ["sentinel"]

    def hook(step_output):
        got[0] = step_output

    @step(enable_cache=False, on_success=hook)
    def s() -> None:
        return None

    @pipeline
    def p():
        s()

    await p.run()
    assert got == [None]


async def test_hooks_get_status(memory_stack):
    """`status` is the StepStatus: COMPLETED on success, FAILED on failure."""
    got: dict[str, StepStatus] = {}

    def on_success(status, step_name):
        got[f"success:{step_name}"] = status

    def on_failure(status, step_name):
        got[f"failure:{step_name}"] = status

    def on_end(status, step_name):
        got[f"end:{step_name}"] = status

    @step(enable_cache=False)
    def ok() -> int:
        return 1

    @step(enable_cache=False)
    def bad() -> int:
        raise RuntimeError("no")

    @pipeline(on_success=on_success, on_failure=on_failure, on_end=on_end)
    def p():
        ok()
        bad()

    with pytest.raises(RunFailedError):
        await p.run()
    assert got == {
        "success:ok": StepStatus.COMPLETED,
        "end:ok": StepStatus.COMPLETED,
        "failure:bad": StepStatus.FAILED,
        "end:bad": StepStatus.FAILED,
    }


async def test_exception_annotation_under_postponed_annotations(memory_stack):
    """A string `BaseException` annotation still gets the exception when another parameter's
    annotation names a type imported only for type checking."""
    got: list[BaseException] = []

    # Quoted as `from __future__ import annotations` would store them.
    def on_failure(err: "BaseException", amount: "Decimal | None" = None):
        got.append(err)

    @step(enable_cache=False, on_failure=on_failure)
    def fails() -> None:
        raise ValueError("postponed")

    @pipeline
    def p():
        fails()

    with pytest.raises(RunFailedError):
        await p.run()
    assert len(got) == 1 and str(got[0]) == "postponed"


async def test_on_start_hook_gets_running_status(memory_stack):
    """`status` in on_start is RUNNING."""
    got: list[StepStatus] = []

    def on_start(status):
        got.append(status)

    @step(enable_cache=False, on_start=on_start)
    def s() -> int:
        return 1

    @pipeline
    def p():
        s()

    await p.run()
    assert got == [StepStatus.RUNNING]


async def test_hook_with_default_valued_extra_parameter_is_fine(memory_stack):
    """A hook parameter flowcore cannot give is allowed when it has a default."""
    got: list[tuple[str, str]] = []

    def hook(step_name, suffix="!"):
        got.append((step_name, suffix))

    @step(enable_cache=False, on_success=hook)
    def s() -> int:
        return 1

    @pipeline
    def p():
        s()

    await p.run()
    assert got == [("s", "!")]


# -- timing -----------------------------------------------------------------------------------


async def test_on_start_before_every_attempt_and_success_once(memory_stack):
    """on_start runs before each attempt; on_success and on_end once, after the last."""
    events: list[str] = []
    attempts = {"n": 0}

    def on_start():
        events.append("start")

    def on_success(step_output):
        events.append(f"success:{step_output}")

    def on_end(exception):
        events.append(f"end:{exception!r}")

    @step(enable_cache=False, retry=StepRetryConfig(max_retries=3, delay=0),
          on_start=on_start, on_success=on_success, on_end=on_end)
    def flaky() -> int:
        attempts["n"] += 1
        events.append(f"body{attempts['n']}")
        if attempts["n"] < 3:
            raise RuntimeError("transient")
        return 42

    @pipeline
    def p():
        flaky()

    run = await p.run()
    assert run.steps["flaky"].attempts == 3
    assert events == ["start", "body1", "start", "body2", "start", "body3", "success:42",
                      "end:None"]


async def test_on_failure_once_after_last_attempt(memory_stack):
    """on_failure and on_end run once, after the last failed attempt, with its exception."""
    events: list[str] = []
    attempts = {"n": 0}

    def on_start():
        events.append("start")

    def on_failure(exception: BaseException):
        events.append(f"failure:{exception}")

    def on_end(exception: BaseException):
        events.append(f"end:{exception}")

    def on_success():
        events.append("success")

    @step(enable_cache=False, retry=StepRetryConfig(max_retries=2, delay=0),
          on_start=on_start, on_failure=on_failure, on_end=on_end, on_success=on_success)
    def always_fails() -> int:
        attempts["n"] += 1
        events.append("body")
        raise RuntimeError(f"fail {attempts['n']}")

    @pipeline
    def p():
        always_fails()

    with pytest.raises(RunFailedError) as info:
        await p.run()
    assert info.value.run.steps["always_fails"].attempts == 3
    assert events == ["start", "body", "start", "body", "start", "body",
                      "failure:fail 3", "end:fail 3"]


async def test_on_success_runs_after_outputs_are_stored(stack):
    """Inside on_success the step run already has its stored, loadable outputs."""
    seen: dict[str, object] = {}

    def on_success():
        ctx = get_step_context()
        seen["keys"] = set(ctx.step_run.outputs)
        seen["value"] = ctx.step_run.outputs["output"].load()
        seen["status"] = ctx.step_run.status
        stored = Client().get_pipeline_run(ctx.pipeline_run.id).steps[ctx.step_run.name]
        seen["stored"] = (stored.status, stored.output.load())

    @step(enable_cache=False, on_success=on_success)
    def s() -> list[int]:
        return [1, 2, 3]

    @pipeline
    def p():
        s()

    await p.run()
    assert seen == {
        "keys": {"output"},
        "value": [1, 2, 3],
        "status": StepStatus.COMPLETED,
        "stored": (StepStatus.COMPLETED, [1, 2, 3]),
    }


async def test_sync_and_async_hooks(memory_stack):
    """Both plain and async callables work as hooks of every kind."""
    events: list[str] = []
    loop_thread = threading.current_thread()
    threads: dict[str, bool] = {}

    async def a_start(step_name):
        await asyncio.sleep(0)
        threads["async_on_loop"] = threading.current_thread() is loop_thread
        events.append(f"a_start:{step_name}")

    def s_success(step_name, step_output):
        events.append(f"s_success:{step_name}:{step_output}")

    async def a_failure(exception):
        await asyncio.sleep(0)
        events.append(f"a_failure:{exception}")

    def s_end(step_name):
        events.append(f"s_end:{step_name}")

    async def a_end(step_name):
        events.append(f"a_end:{step_name}")

    @step(enable_cache=False, on_start=a_start, on_success=s_success, on_end=s_end)
    def good() -> int:
        return 5

    @step(enable_cache=False, on_start=a_start, on_failure=a_failure, on_end=a_end)
    async def bad() -> int:
        raise ValueError("nope")

    @pipeline(execution_mode=ExecutionMode.CONTINUE_ON_FAILURE)
    def p():
        g = good()
        bad(after=g)

    with pytest.raises(RunFailedError):
        await p.run()
    assert events == [
        "a_start:good", "s_success:good:5", "s_end:good",
        "a_start:bad", "a_failure:nope", "a_end:bad",
    ]
    assert threads["async_on_loop"]


# -- precedence -------------------------------------------------------------------------------


async def test_pipeline_hooks_apply_to_every_step_and_step_hook_replaces(memory_stack):
    """Pipeline-level hooks run for every step; a step's own hook of the same kind wins."""
    events: list[str] = []

    def pipe_success(step_name):
        events.append(f"pipe_success:{step_name}")

    def pipe_end(step_name):
        events.append(f"pipe_end:{step_name}")

    def own_success(step_name):
        events.append(f"own_success:{step_name}")

    @step(enable_cache=False)
    def plain() -> int:
        return 1

    @step(enable_cache=False, on_success=own_success)
    def special() -> int:
        return 2

    @pipeline(on_success=pipe_success, on_end=pipe_end)
    def p():
        plain()
        special()

    await p.run()
    assert sorted(events) == sorted([
        "pipe_success:plain", "pipe_end:plain",
        "own_success:special", "pipe_end:special",
    ])


# -- raising hooks ----------------------------------------------------------------------------


def _hook_log_text(record: logging.LogRecord) -> str:
    """A record's message plus its formatted exception, as a handler would show them."""
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + logging.Formatter().formatException(record.exc_info)
    return text


async def test_raising_success_hook_is_logged_and_recorded_without_changing_status(
    stack, caplog
):
    """A raising hook is logged at ERROR on `flowcore` and recorded; the step stays COMPLETED."""
    caplog.set_level(logging.INFO, logger="flowcore")

    def bad_hook():
        raise RuntimeError("hook exploded")

    @step(enable_cache=False, on_success=bad_hook)
    def fine_step() -> int:
        return 1

    @pipeline
    def p():
        fine_step()

    run = await p.run()
    sr = run.steps["fine_step"]
    assert sr.status is StepStatus.COMPLETED
    assert len(sr.hook_errors) == 1
    assert "hook exploded" in str(sr.hook_errors[0].error)
    errors = [r for r in caplog.records
              if r.name.startswith("flowcore") and r.levelno == logging.ERROR]
    assert any("fine_step" in _hook_log_text(r) and "hook exploded" in _hook_log_text(r)
               for r in errors), [r.getMessage() for r in errors]
    stored = Client().get_pipeline_run(run.id)
    assert stored.steps["fine_step"].status is StepStatus.COMPLETED
    assert len(stored.steps["fine_step"].hook_errors) == 1
    assert "hook exploded" in str(stored.steps["fine_step"].hook_errors[0].error)


async def test_raising_failure_hook_keeps_failed_status_and_original_cause(memory_stack, caplog):
    """A raising on_failure hook leaves the step FAILED and the step's own error as the cause."""
    caplog.set_level(logging.INFO, logger="flowcore")

    async def bad_hook(exception):
        raise LookupError("hook broke too")

    @step(enable_cache=False, on_failure=bad_hook)
    def failing() -> int:
        raise ValueError("original")

    @pipeline
    def p():
        failing()

    with pytest.raises(RunFailedError) as info:
        await p.run()
    assert isinstance(info.value.__cause__, ValueError)
    sr = info.value.run.steps["failing"]
    assert sr.status is StepStatus.FAILED
    assert sr.error is not None and sr.error.type == "ValueError"
    assert len(sr.hook_errors) == 1
    assert any("hook broke too" in _hook_log_text(r) and "failing" in _hook_log_text(r)
               for r in caplog.records
               if r.levelno == logging.ERROR and r.name.startswith("flowcore"))


async def test_raising_start_hook_does_not_stop_the_step(memory_stack):
    """A raising on_start hook is recorded but the body still runs and completes."""
    ran: list[str] = []

    def bad_start():
        raise RuntimeError("start hook broke")

    @step(enable_cache=False, on_start=bad_start)
    def s() -> int:
        ran.append("body")
        return 1

    @pipeline
    def p():
        s()

    run = await p.run()
    assert ran == ["body"]
    assert run.steps["s"].status is StepStatus.COMPLETED
    assert len(run.steps["s"].hook_errors) == 1


# -- steps that run no hooks ------------------------------------------------------------------


async def test_cached_steps_run_no_hooks(stack):
    """On a second, cached run no hook of any kind runs."""
    events: list[str] = []

    def on_start(step_name):
        events.append(f"start:{step_name}")

    def on_success(step_name):
        events.append(f"success:{step_name}")

    def on_end(step_name):
        events.append(f"end:{step_name}")

    @step
    def cached_step(x: int) -> int:
        return x * 2

    @pipeline(enable_cache=True, on_start=on_start, on_success=on_success, on_end=on_end)
    def p():
        cached_step(3)

    await p.run()
    assert events == ["start:cached_step", "success:cached_step", "end:cached_step"]
    events.clear()
    run = await p.run()
    assert run.steps["cached_step"].status is StepStatus.CACHED
    assert events == []


async def test_skipped_steps_run_no_hooks(memory_stack):
    """A step skipped because its upstream failed runs no hooks."""
    events: list[str] = []

    def on_start(step_name):
        events.append(f"start:{step_name}")

    def on_failure(step_name):
        events.append(f"failure:{step_name}")

    def on_end(step_name):
        events.append(f"end:{step_name}")

    @step(enable_cache=False)
    def upstream() -> int:
        raise RuntimeError("upstream failed")

    @step(enable_cache=False)
    def downstream(x: int) -> int:
        return x

    @pipeline(on_start=on_start, on_failure=on_failure, on_end=on_end)
    def p():
        downstream(upstream())

    with pytest.raises(RunFailedError) as info:
        await p.run()
    assert info.value.run.steps["downstream"].status is StepStatus.SKIPPED
    assert events == ["start:upstream", "failure:upstream", "end:upstream"]


async def test_stopped_steps_run_no_end_hooks(memory_stack):
    """A step stopped by FAIL_FAST runs no on_success, on_failure or on_end hook."""
    events: list[str] = []

    def on_success(step_name):
        events.append(f"success:{step_name}")

    def on_failure(step_name):
        events.append(f"failure:{step_name}")

    def on_end(step_name):
        events.append(f"end:{step_name}")

    @step(enable_cache=False)
    async def long_running() -> int:
        await asyncio.sleep(10)
        return 1

    @step(enable_cache=False)
    async def fails_soon() -> int:
        await asyncio.sleep(0.05)
        raise RuntimeError("fail fast")

    @pipeline(execution_mode=ExecutionMode.FAIL_FAST, on_success=on_success,
              on_failure=on_failure, on_end=on_end)
    def p():
        long_running()
        fails_soon()

    with pytest.raises(RunFailedError) as info:
        await asyncio.wait_for(p.run(), timeout=8)
    assert info.value.run.steps["long_running"].status is StepStatus.STOPPED
    assert events == ["failure:fails_soon", "end:fails_soon"]


# -- step context -----------------------------------------------------------------------------


def _snapshot(where: str, out: dict[str, dict[str, object]]) -> None:
    """Record what get_step_context() shows."""
    ctx = get_step_context()
    out[where] = {
        "step": ctx.step_run.name,
        "params": dict(ctx.step_run.config.parameters),
        "attempt": ctx.step_run.attempt,
        "run_name": ctx.pipeline_run.name,
        "run_id": ctx.pipeline_run.id,
        "pipeline": ctx.pipeline.name,
        "stack": ctx.stack,
        "thread": threading.current_thread(),
    }


async def test_step_context_in_async_body_sync_body_and_hooks(stack):
    """get_step_context() shows the step run, parameters, attempt, run, pipeline and stack."""
    seen: dict[str, dict[str, object]] = {}

    def sync_hook():
        _snapshot("sync_hook", seen)

    async def async_hook():
        _snapshot("async_hook", seen)

    @step(enable_cache=False, on_success=sync_hook)
    async def async_body(some_parameter: int, label: str = "x") -> int:
        _snapshot("async_body", seen)
        return some_parameter

    @step(enable_cache=False, on_success=async_hook)
    def sync_body(factor: float, upstream: int) -> float:
        _snapshot("sync_body", seen)
        return factor * upstream

    @pipeline
    def context_pipeline():
        u = async_body(some_parameter=7, step_name="first")
        sync_body(factor=2.5, upstream=u)

    loop_thread = threading.current_thread()
    run = await context_pipeline.run()
    assert set(seen) == {"async_body", "sync_body", "sync_hook", "async_hook"}
    for where, snap in seen.items():
        assert snap["run_name"] == run.name, where
        assert snap["run_id"] == run.id, where
        assert snap["pipeline"] == "context_pipeline", where
        assert snap["stack"] is stack, where
        assert snap["attempt"] == 1, where
    assert seen["async_body"]["step"] == "first"
    assert seen["sync_hook"]["step"] == "first"
    assert seen["sync_body"]["step"] == "sync_body"
    assert seen["async_hook"]["step"] == "sync_body"
    assert seen["async_body"]["params"]["some_parameter"] == 7
    assert seen["sync_body"]["params"]["factor"] == 2.5
    assert "upstream" not in seen["sync_body"]["params"]  # an artifact, not a parameter
    assert seen["async_body"]["thread"] is loop_thread
    assert seen["sync_body"]["thread"] is not loop_thread


async def test_step_context_attempt_counts_retries(memory_stack):
    """`step_run.attempt` is 1 on the first try and grows on each retry, also in on_start."""
    body_attempts: list[int] = []
    start_attempts: list[int] = []

    def on_start():
        start_attempts.append(get_step_context().step_run.attempt)

    @step(enable_cache=False, retry=StepRetryConfig(max_retries=2, delay=0), on_start=on_start)
    def flaky() -> int:
        body_attempts.append(get_step_context().step_run.attempt)
        if len(body_attempts) < 3:
            raise RuntimeError("again")
        return 1

    @pipeline
    def p():
        flaky()

    await p.run()
    assert body_attempts == [1, 2, 3]
    assert start_attempts == [1, 2, 3]


async def test_failure_hook_context_like_the_seed(memory_stack):
    """The seed's on_failure hook reads step name, parameters and pipeline run name."""
    got: dict[str, object] = {}

    def on_failure(exception: BaseException):
        context = get_step_context()
        got["step"] = context.step_run.name
        got["params"] = dict(context.step_run.config.parameters)
        got["exc"] = f"{type(exception).__name__}: {exception}"
        got["run"] = context.pipeline_run.name

    @step(enable_cache=False, on_failure=on_failure)
    def my_step(some_parameter: int = 1) -> None:
        raise ValueError("My exception")

    @pipeline
    def p():
        my_step(some_parameter=5)

    with pytest.raises(RunFailedError) as info:
        await p.run()
    assert got == {
        "step": "my_step",
        "params": {"some_parameter": 5},
        "exc": "ValueError: My exception",
        "run": info.value.run.name,
    }


def test_step_context_outside_a_step_raises(memory_stack):
    """get_step_context() outside a step body or hook raises StepContextError."""
    with pytest.raises(StepContextError):
        get_step_context()


async def test_step_context_outside_a_step_raises_on_loop_and_after_a_run(memory_stack):
    """On an event loop, before and after a run, get_step_context() raises StepContextError."""

    @step(enable_cache=False)
    async def s() -> int:
        return get_step_context().step_run.attempt

    @pipeline
    def p():
        s()

    with pytest.raises(StepContextError):
        get_step_context()
    await p.run()
    with pytest.raises(StepContextError):
        get_step_context()


async def test_step_context_isolated_between_concurrent_steps(memory_stack):
    """Concurrent steps each see their own context across awaits."""
    seen: dict[str, str] = {}

    @step(enable_cache=False)
    async def worker(delay: float) -> None:
        before = get_step_context().step_run.name
        await asyncio.sleep(delay)
        seen[before] = get_step_context().step_run.name

    @pipeline
    def p():
        worker(0.1, step_name="w1")
        worker(0.05, step_name="w2")
        worker(0.0, step_name="w3")

    await p.run()
    assert seen == {"w1": "w1", "w2": "w2", "w3": "w3"}
