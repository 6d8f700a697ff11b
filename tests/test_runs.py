"""Runs and their records, run names, logging, and single steps called outside a pipeline."""

import asyncio
import logging
import os
import re
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

import pytest

from flowcore import (
    ArtifactVersion,
    Client,
    ConfigError,
    FlowcoreError,
    PipelineDefinitionError,
    PipelineRun,
    RunFailedError,
    RunNameConflictError,
    RunStatus,
    Stack,
    StepContextError,
    StepInputError,
    StepRetryConfig,
    StepRun,
    StepStatus,
    get_step_context,
    pipeline,
    step,
)

DEFAULT_NAME = re.compile(r"^(?P<p>.+)-(?P<date>\d{4}_\d{2}_\d{2})-(?P<time>\d{2}_\d{2}_\d{2}_\d{6})$")


def _parse_name_time(date: str, time: str) -> datetime:
    """The UTC datetime a `{date}-{time}` pair encodes."""
    return datetime.strptime(f"{date} {time}", "%Y_%m_%d %H_%M_%S_%f").replace(tzinfo=UTC)


def _is_aware(value: datetime | None) -> bool:
    """Whether a datetime is timezone-aware."""
    return value is not None and value.tzinfo is not None and value.utcoffset() is not None


def _count_shown(text: str, word: str, n: int) -> bool:
    """Whether a repr shows `n` next to `word` (`2 completed`, `completed=2`, `completed: 2`)."""
    w = re.escape(word)
    patterns = [rf"\b{n}\s+{w}\b", rf"\b{w}\s*[=:]\s*{n}\b"]
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


# -- a small pipeline with every outcome ------------------------------------------------------


@step(enable_cache=False)
def produce(n: int = 3) -> list[int]:
    return list(range(n))


@step(enable_cache=False)
def total(values: list[int]) -> int:
    return sum(values)


@step(enable_cache=False)
def explode(values: list[int]) -> int:
    raise ValueError(f"boom with {len(values)} values")


@step(enable_cache=False)
def never(x: int) -> int:
    return x


@pipeline
def mixed_outcomes():
    values = produce(n=3)
    total(values)
    never(explode(values))


# -- PipelineRun / StepRun / ArtifactVersion --------------------------------------------------


async def test_pipeline_run_fields(stack):
    """`await p.run()` returns a PipelineRun with id, names, status, aware times and steps."""

    @step(enable_cache=False)
    def one() -> int:
        return 1

    @pipeline
    def simple_pipeline():
        one()

    before = datetime.now(UTC)
    run = await simple_pipeline.run()
    after = datetime.now(UTC)
    assert isinstance(run, PipelineRun)
    assert isinstance(run.id, str) and run.id
    assert run.name.startswith("simple_pipeline-")
    assert run.pipeline_name == "simple_pipeline"
    assert run.status is RunStatus.COMPLETED
    assert _is_aware(run.start_time) and _is_aware(run.end_time)
    assert before - timedelta(seconds=1) <= run.start_time <= run.end_time
    assert run.end_time <= after + timedelta(seconds=1)
    assert list(run.steps) == ["one"]
    assert isinstance(run.steps["one"], StepRun)


async def test_step_run_fields_on_success(stack):
    """A completed StepRun has its name, status, attempts, aware times, parameters, outputs."""

    @step(enable_cache=False)
    def scale(x: int, factor: int = 2) -> int:
        return x * factor

    @pipeline
    def p():
        scale(x=5, step_name="scaled")

    run = await p.run()
    sr = run.steps["scaled"]
    assert sr.name == "scaled"
    assert sr.status is StepStatus.COMPLETED
    assert sr.attempts == 1
    assert _is_aware(sr.start_time) and _is_aware(sr.end_time)
    assert sr.start_time <= sr.end_time
    assert sr.error is None
    assert sr.config.parameters["x"] == 5
    assert set(sr.outputs) == {"output"}
    assert sr.output is sr.outputs["output"]
    art = sr.output
    assert isinstance(art, ArtifactVersion)
    assert art.load() == 10
    assert await art.aload() == 10
    assert isinstance(art.id, str) and art.id
    assert isinstance(art.uri, str) and art.uri
    assert isinstance(art.content_hash, str) and art.content_hash
    assert art.materializer


async def test_step_run_error_info(stack):
    """A failed StepRun's error has the exception type, message and traceback text."""
    with pytest.raises(RunFailedError) as info:
        await mixed_outcomes.run()
    run = info.value.run
    sr = run.steps["explode"]
    assert sr.status is StepStatus.FAILED
    assert sr.outputs == {}
    assert sr.error is not None
    assert sr.error.type == "ValueError"
    assert sr.error.message == "boom with 3 values"
    assert "Traceback" in sr.error.traceback
    assert "explode" in sr.error.traceback
    assert "ValueError: boom with 3 values" in sr.error.traceback
    assert _is_aware(sr.end_time)


async def test_run_failed_error_carries_run_and_first_cause(stack):
    """RunFailedError has `.run` (FAILED, with every step's status) and the step's exception as
    `__cause__`."""
    with pytest.raises(RunFailedError) as info:
        await mixed_outcomes.run()
    err = info.value
    assert isinstance(err.__cause__, ValueError)
    assert str(err.__cause__) == "boom with 3 values"
    run = err.run
    assert run.status is RunStatus.FAILED
    assert {k: s.status for k, s in run.steps.items()} == {
        "produce": StepStatus.COMPLETED,
        "total": StepStatus.COMPLETED,
        "explode": StepStatus.FAILED,
        "never": StepStatus.SKIPPED,
    }
    assert "explode" in str(err)


async def test_stored_run_matches_returned_run(stack):
    """The client reads back the same run, step statuses, errors and loadable outputs."""
    with pytest.raises(RunFailedError) as info:
        await mixed_outcomes.run()
    run = info.value.run
    stored = Client().get_pipeline_run(run.name)
    assert stored.id == run.id
    assert stored.status is RunStatus.FAILED
    assert _is_aware(stored.start_time) and _is_aware(stored.end_time)
    assert {k: s.status for k, s in stored.steps.items()} == {
        k: s.status for k, s in run.steps.items()
    }
    assert stored.steps["total"].output.load() == 3
    assert stored.steps["total"].config.parameters == run.steps["total"].config.parameters
    assert stored.steps["explode"].error.type == "ValueError"
    assert "boom" in stored.steps["explode"].error.traceback
    assert Client().get_pipeline_run(run.id).name == run.name


async def test_step_run_names_are_plain_invocation_ids_when_composed(stack):
    """Composed and repeated steps keep plain invocation IDs as StepRun names, also when read
    back (fine point 2)."""

    @step(enable_cache=False)
    def prep_data(x: int) -> int:
        return x + 1

    @pipeline
    def inner(x: int):
        return prep_data(x)

    @pipeline
    def outer():
        inner(1)
        inner(2)
        prep_data(3, step_name="explicit")

    run = await outer.run()
    assert {k: s.name for k, s in run.steps.items()} == {
        "prep_data": "prep_data", "prep_data_2": "prep_data_2", "explicit": "explicit",
    }
    stored = Client().get_pipeline_run(run.id)
    assert {k: s.name for k, s in stored.steps.items()} == {
        "prep_data": "prep_data", "prep_data_2": "prep_data_2", "explicit": "explicit",
    }
    assert stored.steps["prep_data_2"].output.load() == 3


async def test_artifact_version_id_and_client_lookup(stack):
    """`ArtifactVersion.id` finds the artifact through the client; equal content hashes equal."""

    @step(enable_cache=False)
    def make(v: str) -> str:
        return v

    @pipeline
    def p():
        make("same", step_name="a")
        make("same", step_name="b")
        make("other", step_name="c")

    run = await p.run()
    a, b, c = (run.steps[k].output for k in "abc")
    assert len({a.id, b.id, c.id}) == 3
    assert a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash
    fetched = Client().get_artifact_version(c.id)
    assert fetched.id == c.id
    assert fetched.load() == "other"


async def test_reprs_show_state(memory_stack):
    """Reprs show the run name, status and per-status step counts."""
    with pytest.raises(RunFailedError) as info:
        await mixed_outcomes.run()
    run = info.value.run
    text = repr(run)
    assert text.startswith("<PipelineRun")
    assert run.name in text
    assert "FAILED" in text
    assert _count_shown(text, "completed", 2), text
    assert _count_shown(text, "failed", 1), text
    assert _count_shown(text, "skipped", 1), text
    step_text = repr(run.steps["explode"])
    assert "explode" in step_text and "FAILED" in step_text.upper()
    assert "explode" not in repr(run.steps["total"])
    assert "COMPLETED" in repr(run.steps["total"]).upper()


async def test_retried_step_that_succeeds_has_no_error(stack):
    """A step that fails once and then succeeds is COMPLETED with 2 attempts and no error."""
    tries = {"n": 0}

    @step(enable_cache=False, retry=StepRetryConfig(max_retries=2, delay=0))
    def flaky() -> int:
        tries["n"] += 1
        if tries["n"] == 1:
            raise RuntimeError("transient")
        return 7

    @pipeline
    def p():
        flaky()

    run = await p.run()
    sr = run.steps["flaky"]
    assert (sr.status, sr.attempts, sr.error) == (StepStatus.COMPLETED, 2, None)
    stored = Client().get_pipeline_run(run.id).steps["flaky"]
    assert (stored.status, stored.attempts, stored.error) == (StepStatus.COMPLETED, 2, None)
    assert stored.output.load() == 7


async def test_configuration_error_raised_before_run_is_recorded(stack):
    """An unknown step operator is a ConfigError raised directly, with no step run and no run
    recorded (fine point 4)."""
    ran: list[str] = []

    @step(enable_cache=False)
    def first() -> None:
        ran.append("first")

    @step(enable_cache=False, step_operator="no_such_operator")
    def remote() -> None:
        ran.append("remote")

    @pipeline
    def p():
        first()
        remote()

    with pytest.raises(ConfigError, match="no_such_operator"):
        await p.run()
    assert ran == []
    assert Client().list_pipeline_runs() == []


# -- run names --------------------------------------------------------------------------------


async def test_default_run_name_format(stack):
    """The default name is `{pipeline_name}-{date}-{time}` in UTC with microseconds."""

    @step(enable_cache=False)
    def s() -> None: ...

    @pipeline
    def nameless():
        s()

    run = await nameless.run()
    m = DEFAULT_NAME.match(run.name)
    assert m, run.name
    assert m["p"] == "nameless"
    encoded = _parse_name_time(m["date"], m["time"])
    assert abs(encoded - run.start_time) < timedelta(seconds=5)


async def test_default_run_names_unique_within_a_second(stack):
    """Runs started back to back (same second) get distinct default names (fine point 1)."""

    @step(enable_cache=False)
    async def s() -> None: ...

    @pipeline
    def quick():
        s()

    runs = [await quick.run() for _ in range(3)]
    runs += await asyncio.gather(*(quick.run() for _ in range(3)))
    names = [r.name for r in runs]
    assert len(set(names)) == 6
    assert all(r.status is RunStatus.COMPLETED for r in runs)
    assert len(Client().list_pipeline_runs(pipeline_name="quick")) == 6


async def test_custom_run_name_placeholders(memory_stack):
    """`{date}`, `{time}`, `{run_id}`, `{pipeline_name}` and substitutions fill a run name."""

    @step(enable_cache=False)
    def s() -> None: ...

    @pipeline
    def nightly_pipeline():
        s()

    run = await nightly_pipeline.with_options(run_name="nightly_{date}_{time}").run()
    m = re.fullmatch(r"nightly_(\d{4}_\d{2}_\d{2})_(\d{2}_\d{2}_\d{2}_\d{6})", run.name)
    assert m, run.name
    assert abs(_parse_name_time(m[1], m[2]) - run.start_time) < timedelta(seconds=5)

    run = await nightly_pipeline.with_options(run_name="{pipeline_name}__{run_id}").run()
    assert run.name == f"nightly_pipeline__{run.id}"

    run = await nightly_pipeline.with_options(
        run_name="exp_{team}_{run_id}", substitutions={"team": "vision"}
    ).run()
    assert run.name == f"exp_vision_{run.id}"


async def test_unknown_run_name_placeholder_is_config_error(stack):
    """A placeholder nobody provides is a ConfigError before any step runs or a run is
    recorded."""
    ran: list[str] = []

    @step(enable_cache=False)
    def s() -> None:
        ran.append("s")

    @pipeline
    def p():
        s()

    with pytest.raises(ConfigError, match="owner"):
        await p.with_options(run_name="run_{owner}_{date}").run()
    assert ran == []
    assert Client().list_pipeline_runs() == []


async def test_reused_run_name_is_conflict_before_any_step_runs(stack):
    """A name already used raises RunNameConflictError before any step of the second run."""
    ran: list[str] = []

    @step(enable_cache=False)
    def s() -> None:
        ran.append("s")

    @pipeline
    def p():
        s()

    fixed = p.with_options(run_name="fixed_name")
    first = await fixed.run()
    assert first.name == "fixed_name"
    assert ran == ["s"]
    with pytest.raises(RunNameConflictError, match="fixed_name"):
        await fixed.run()
    assert ran == ["s"]
    runs = Client().list_pipeline_runs()
    assert [r.id for r in runs] == [first.id]
    assert runs[0].status is RunStatus.COMPLETED


def test_reused_run_name_is_conflict_from_sync_call(stack):
    """A synchronous `p()` with a used name raises RunNameConflictError directly."""
    ran: list[str] = []

    @step(enable_cache=False)
    def s() -> None:
        ran.append("s")

    @pipeline(run_name="only_once")
    def p():
        s()

    p()
    with pytest.raises(RunNameConflictError):
        p()
    assert ran == ["s"]
    assert len(Client().list_pipeline_runs()) == 1


# -- synchronous calls ------------------------------------------------------------------------


def test_sync_call_returns_pipeline_run(stack):
    """`p()` from synchronous code runs to the end and returns the PipelineRun."""

    @step(enable_cache=False)
    def s(x: int) -> int:
        return x + 1

    @pipeline
    def p(x: int = 1):
        s(x)

    run = p(x=41)
    assert isinstance(run, PipelineRun)
    assert run.status is RunStatus.COMPLETED
    assert run.steps["s"].output.load() == 42
    assert Client().get_pipeline_run(run.id).status is RunStatus.COMPLETED


def test_sync_call_raises_run_failed_error(memory_stack):
    """A failing run started with `p()` raises RunFailedError with the step's cause."""
    with pytest.raises(RunFailedError) as info:
        mixed_outcomes()
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.run.status is RunStatus.FAILED


def test_definition_error_raised_directly_from_sync_call(stack):
    """A definition error from `p()` is raised directly, before any run is recorded."""
    ran: list[str] = []

    @step(enable_cache=False)
    def s() -> None:
        ran.append("s")

    @pipeline
    def p():
        s(step_name="dup")
        s(step_name="dup")

    with pytest.raises(PipelineDefinitionError):
        p()
    assert ran == []
    assert Client().list_pipeline_runs() == []


async def test_sync_call_on_running_loop_says_use_await(memory_stack):
    """`p()` on a thread with a running loop raises an error telling the user to `await`."""
    ran: list[str] = []

    @step(enable_cache=False)
    def s() -> None:
        ran.append("s")

    @pipeline
    def p():
        s()

    with pytest.raises(FlowcoreError) as info:
        p()
    assert "await" in str(info.value)
    assert ran == []
    assert Client().list_pipeline_runs() == []


# -- logging ----------------------------------------------------------------------------------


def _flowcore_messages(caplog) -> list[logging.LogRecord]:
    """Records emitted on the `flowcore` logger or its children."""
    return [r for r in caplog.records if r.name == "flowcore" or r.name.startswith("flowcore.")]


def _events_named(records: list[logging.LogRecord], event: str) -> list[str]:
    """The messages of records whose event name is `event`."""
    return [r.getMessage() for r in records if re.search(rf"\b{event}\b", r.getMessage())]


async def test_run_emits_structured_events(memory_stack, caplog):
    """A run emits run/step events with run and step names, durations and retry details."""
    caplog.set_level(logging.INFO, logger="flowcore")
    tries = {"n": 0}

    @step(enable_cache=False, retry=StepRetryConfig(max_retries=1, delay=0.01))
    def wobbly() -> int:
        tries["n"] += 1
        if tries["n"] == 1:
            raise RuntimeError("first try fails")
        return 1

    @step(enable_cache=False)
    def crash(x: int) -> int:
        raise ValueError("crash")

    @step(enable_cache=False)
    def after_crash(x: int) -> int:
        return x

    @pipeline
    def logged_pipeline():
        after_crash(crash(wobbly()))

    with pytest.raises(RunFailedError) as info:
        await logged_pipeline.run()
    run_name = info.value.run.name
    records = _flowcore_messages(caplog)

    started = _events_named(records, "run_started")
    assert len(started) == 1 and run_name in started[0]
    failed_run = _events_named(records, "run_failed")
    assert len(failed_run) == 1 and run_name in failed_run[0]
    assert _events_named(records, "run_completed") == []

    step_started = _events_named(records, "step_started")
    assert any("wobbly" in m for m in step_started)
    assert any("crash" in m for m in step_started)
    assert all(run_name in m for m in step_started)

    retrying = _events_named(records, "step_retrying")
    assert len(retrying) == 1
    assert "wobbly" in retrying[0] and run_name in retrying[0]
    assert "attempt" in retrying[0] and "delay" in retrying[0]
    assert "0.01" in retrying[0]

    completed = _events_named(records, "step_completed")
    assert len(completed) == 1
    assert "wobbly" in completed[0] and run_name in completed[0] and "duration" in completed[0]

    step_failed = _events_named(records, "step_failed")
    assert len(step_failed) == 1
    assert "crash" in step_failed[0] and run_name in step_failed[0]

    skipped = _events_named(records, "step_skipped")
    assert len(skipped) == 1
    assert "after_crash" in skipped[0] and run_name in skipped[0]


async def test_clean_run_logs_run_completed_and_nothing_at_warning(memory_stack, caplog):
    """A clean run emits run_completed and nothing at WARNING or above."""
    caplog.set_level(logging.DEBUG, logger="flowcore")

    @step(enable_cache=False)
    def fine(x: int) -> int:
        return x

    @pipeline
    def clean_pipeline():
        fine(fine(1, step_name="a"), step_name="b")

    run = await clean_pipeline.run()
    records = _flowcore_messages(caplog)
    done = _events_named(records, "run_completed")
    assert len(done) == 1 and run.name in done[0]
    assert len(_events_named(records, "step_completed")) == 2
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []


async def test_flowcore_never_configures_logging(memory_stack, caplog):
    """A run adds no handler to the root logger and leaves the `flowcore` logger's setup
    alone."""
    caplog.set_level(logging.INFO, logger="flowcore")
    root = logging.getLogger()
    fc = logging.getLogger("flowcore")
    root_before = list(root.handlers)
    root_level = root.level
    fc_before = (list(fc.handlers), fc.level, fc.propagate)

    @step(enable_cache=False)
    def s() -> int:
        return 1

    @step(enable_cache=False)
    def bad() -> int:
        raise RuntimeError("x")

    @pipeline
    def p():
        s()
        bad()

    with pytest.raises(RunFailedError):
        await p.run()
    assert list(root.handlers) == root_before
    assert root.level == root_level
    assert (list(fc.handlers), fc.level, fc.propagate) == fc_before


async def test_run_prints_nothing(memory_stack, capsys):
    """A run (also a failing one) writes nothing to stdout or stderr by itself."""

    @step(enable_cache=False)
    def bad() -> int:
        raise RuntimeError("quiet please")

    @pipeline
    def p():
        bad()

    with pytest.raises(RunFailedError):
        await p.run()
    out, err = capsys.readouterr()
    assert out == ""
    assert "quiet please" not in err and "step_failed" not in err


def test_failing_run_prints_nothing_when_host_configures_no_logging(tmp_path):
    """In a fresh process that configures no logging, a failing run writes nothing to
    stderr."""
    script = textwrap.dedent(
        """
        import flowcore
        from flowcore import RunFailedError, Stack, pipeline, step

        flowcore.set_active_stack(Stack.in_memory())

        @step(enable_cache=False)
        def bad() -> int:
            raise RuntimeError("quiet please")

        @pipeline
        def p():
            bad()

        try:
            p()
        except RunFailedError:
            print("failed as expected")
        """
    )
    env = {**os.environ, "FLOWCORE_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
        cwd=tmp_path,
    )
    assert proc.stdout.strip() == "failed as expected", proc.stderr
    assert proc.stderr == ""


def test_raising_hook_logged_at_error_from_sync_run(memory_stack, caplog):
    """A raising hook in a `p()` run is logged at ERROR on `flowcore` with step and error
    (fine point 12)."""
    caplog.set_level(logging.INFO, logger="flowcore")

    def noisy_hook(step_name):
        raise ConnectionError(f"alert service down for {step_name}")

    @step(enable_cache=False, on_success=noisy_hook)
    def notify_me() -> int:
        return 1

    @pipeline
    def p():
        notify_me()

    run = p()
    assert run.status is RunStatus.COMPLETED
    assert run.steps["notify_me"].status is StepStatus.COMPLETED
    errors = [r for r in _flowcore_messages(caplog) if r.levelno == logging.ERROR]
    texts = []
    for r in errors:
        text = r.getMessage()
        if r.exc_info:
            text += logging.Formatter().formatException(r.exc_info)
        texts.append(text)
    assert any("notify_me" in t and "alert service down for notify_me" in t for t in texts), texts
    assert len(run.steps["notify_me"].hook_errors) == 1
    stored = Client().get_pipeline_run(run.id).steps["notify_me"]
    assert len(stored.hook_errors) == 1


# -- single steps outside a pipeline ----------------------------------------------------------


def test_single_step_call_returns_value(stack):
    """`s(1, 2)` outside a pipeline returns the output value and lists no run."""

    @step
    def add(a: int, b: int) -> int:
        return a + b

    assert add(1, 2) == 3
    assert add(a=5, b=6) == 11
    assert Client().list_pipeline_runs() == []


async def test_single_step_await_run_on_loop(stack):
    """`await s.run(...)` on an event loop returns the output value (also for async steps)."""

    @step
    def add(a: int, b: int) -> int:
        return a + b

    @step
    async def mul(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a * b

    assert await add.run(1, 2) == 3
    assert await mul.run(3, b=4) == 12


def test_single_step_multiple_outputs_return_tuple(memory_stack):
    """A multi-output step called alone returns a tuple; a no-output step returns None."""

    @step
    def train_classifier(n: int) -> tuple[str, float]:
        return f"model{n}", 0.5 * n

    @step
    def nothing() -> None:
        return None

    model, accuracy = train_classifier(n=2)
    assert (model, accuracy) == ("model2", 1.0)
    assert nothing() is None


async def test_single_step_await_multiple_outputs(memory_stack):
    """`await s.run()` returns a tuple for several outputs."""

    @step
    async def pair() -> tuple[int, int]:
        return 1, 2

    assert await pair.run() == (1, 2)


def test_single_step_runs_hooks_and_has_context(memory_stack):
    """A single step call runs its hooks and its body and hooks see a step context."""
    seen: dict[str, object] = {}

    def on_success(step_name, step_output):
        seen["hook"] = (step_name, step_output, get_step_context().step_run.name)

    def on_end():
        seen["end"] = True

    @step(on_success=on_success, on_end=on_end)
    def ctx_step(x: int) -> int:
        ctx = get_step_context()
        seen["body"] = (ctx.step_run.name, ctx.step_run.config.parameters.get("x"),
                        bool(ctx.pipeline_run.name))
        return x * 10

    assert ctx_step(4) == 40
    assert seen["body"] == ("ctx_step", 4, True)
    assert seen["hook"] == ("ctx_step", 40, "ctx_step")
    assert seen["end"] is True


def test_single_step_wrong_input_raises_step_input_error_directly(memory_stack):
    """A wrong input to a single step raises StepInputError itself, not RunFailedError."""
    ran: list[str] = []

    @step
    def add(a: int, b: int) -> int:
        ran.append("add")
        return a + b

    with pytest.raises(StepInputError) as info:
        add("one", 2)
    assert "add" in str(info.value) and "'a'" in str(info.value)
    assert ran == []


async def test_single_step_errors_raised_directly(memory_stack):
    """A single step's own exception is raised directly from `s()` and `await s.run()`."""

    @step
    def fail(msg: str) -> None:
        raise KeyError(msg)

    with pytest.raises(KeyError, match="direct"):
        await fail.run("direct")


def test_single_step_failure_hook_runs(memory_stack):
    """A failing single step runs its failure hook once and raises its own error."""
    got: list[BaseException] = []

    def on_failure(exception: BaseException):
        got.append(exception)

    @step(on_failure=on_failure)
    def fail() -> None:
        raise ValueError("single boom")

    with pytest.raises(ValueError, match="single boom"):
        fail()
    assert len(got) == 1 and str(got[0]) == "single boom"


async def test_single_step_sync_call_on_running_loop_says_use_await(memory_stack):
    """Calling a step synchronously on a running loop raises an error telling to `await`."""
    ran: list[str] = []

    @step
    def s() -> int:
        ran.append("s")
        return 1

    with pytest.raises(FlowcoreError) as info:
        s()
    assert "await" in str(info.value)
    assert ran == []


async def test_single_steps_without_stack_call_the_raw_function(memory_stack, monkeypatch):
    """With FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK=true a step call is its entrypoint."""
    monkeypatch.setenv("FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK", "true")
    hooks: list[str] = []
    contexts: list[str] = []

    def on_success():
        hooks.append("success")

    @step(on_success=on_success)
    def add(a: int, b: int) -> int:
        try:
            get_step_context()
        except StepContextError:
            contexts.append("none")
        return a + b

    @step(on_success=on_success)
    async def amul(a: int, b: int) -> int:
        return a * b

    assert add.entrypoint(1, 2) == 3
    assert await add.run(1, 2) == 3
    assert await add.run("x", "y") == "xy"  # no validation: the raw function
    assert await amul.run(2, 3) == 6
    assert hooks == []
    assert contexts == ["none", "none", "none"]
    assert Client().list_pipeline_runs() == []


def test_single_steps_without_stack_sync_call(memory_stack, monkeypatch):
    """With the flag set, a synchronous `s(...)` calls the raw function and runs no hooks."""
    monkeypatch.setenv("FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK", "true")
    hooks: list[str] = []

    def on_end():
        hooks.append("end")

    @step(on_end=on_end)
    def add(a: int, b: int) -> int:
        return a + b

    assert add(1, 2) == 3
    assert add("a", "b") == "ab"
    assert hooks == []


async def test_structlog_events_inside_a_step_carry_run_step_and_attempt(
    memory_stack: Stack, caplog: pytest.LogCaptureFixture,
) -> None:
    """With flowcore logging on, a step body's own structlog context holds run, step and
    attempt (bound per task, so concurrent steps keep their own)."""
    import structlog

    seen: dict[str, dict[str, object]] = {}

    @step(enable_cache=False)
    async def look(tag: str) -> None:
        await asyncio.sleep(0.01)
        seen[tag] = dict(structlog.contextvars.get_contextvars())

    @pipeline
    def two() -> None:
        look("a", step_name="first")
        look("b", step_name="second")

    with caplog.at_level(logging.INFO, logger="flowcore"):
        run = await two.run()
    assert seen["a"] == {"run": run.name, "step": "first", "attempt": 1}
    assert seen["b"] == {"run": run.name, "step": "second", "attempt": 1}


async def test_an_output_nothing_can_store_fails_the_step_on_both_stacks(stack: Stack) -> None:
    """Returning a threading.Lock fails the step with MaterializerError (the cause of
    RunFailedError) on the in-memory stack as on the SQLite one."""
    import threading

    from flowcore import MaterializerError

    @step(enable_cache=False)
    def locked() -> object:
        return threading.Lock()

    @pipeline
    def unstorable() -> None:
        locked()

    with pytest.raises(RunFailedError) as info:
        await unstorable.run()
    assert isinstance(info.value.__cause__, MaterializerError)
    assert "locked" in str(info.value.__cause__)
    assert info.value.run is not None
    assert info.value.run.steps["locked"].status is StepStatus.FAILED
