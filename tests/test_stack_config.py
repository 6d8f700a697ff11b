"""Stacks and configuration (API.md section 9): building stacks in code and from YAML, choosing
the active stack, stack components named by steps, validated settings, YAML run configuration
and the precedence of configuration layers."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

import flowcore
from flowcore import (
    Client,
    ConfigError,
    ExecutionMode,
    RunFailedError,
    RunHandle,
    RunStatus,
    Stack,
    StepStatus,
    get_step_context,
    pipeline,
    step,
)
from flowcore.stack import (
    DaskStepOperator,
    ExperimentTracker,
    MLflowExperimentTracker,
    ProcessStepOperator,
    StepOperator,
    WebhookAlerter,
)

# -- helpers -------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    """Write `text` to `path` (creating parents) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@step(enable_cache=False)
def answer() -> int:
    return 42


@pipeline
def answer_pipeline() -> None:
    answer()


def warnings_about(caplog: pytest.LogCaptureFixture, key: str) -> list[logging.LogRecord]:
    """WARNING records of logger `flowcore` whose message mentions `key`."""
    return [r for r in caplog.records
            if r.name == "flowcore" and r.levelno == logging.WARNING and key in r.getMessage()]


# -- building stacks -----------------------------------------------------------------------


def test_in_memory_stack_keeps_runs_in_the_process_only(tmp_path: Path) -> None:
    """A run on Stack.in_memory() is visible through a Client of that stack, not of another one,
    and nothing is written under FLOWCORE_HOME."""
    mem = Stack.in_memory()
    run = answer_pipeline.with_options(stack=mem)()
    assert run.status is RunStatus.COMPLETED
    assert run.steps["answer"].output.load() == 42
    assert Client(mem).get_pipeline_run(run.name).id == run.id
    assert Client(Stack.in_memory()).list_pipeline_runs() == []
    home = Path(os.environ["FLOWCORE_HOME"])
    assert not home.exists() or not any(home.rglob("*"))


def test_local_stack_is_rooted_at_its_path_and_durable(tmp_path: Path) -> None:
    """Stack.local(path) writes its SQLite database and artifacts under `path`; a new stack on
    the same path sees the run and loads its output."""
    root = tmp_path / "somewhere"
    run = answer_pipeline.with_options(stack=Stack.local(root))()
    assert (root / "flowcore.db").is_file()
    # A small output is kept inline, in the row of root's flowcore.db (no artifact file).
    assert run.steps["answer"].output.uri.startswith("inline:")
    again = Client(Stack.local(root)).get_pipeline_run(run.name)
    assert again.status is RunStatus.COMPLETED
    assert again.steps["answer"].output.load() == 42
    home = Path(os.environ["FLOWCORE_HOME"])
    assert not (home / "flowcore.db").exists()


def test_from_yaml_builds_stores_and_components(tmp_path: Path) -> None:
    """A stack file with metadata and artifact store paths (relative to the file), an alerter,
    step operators and an experiment tracker builds those components with their options."""
    path = write(tmp_path / "conf" / "stack.yaml", """
metadata_store: {path: meta/flowcore.db}
artifact_store: {path: blobs}
alerter: {type: webhook, url: "http://127.0.0.1:9/hook"}
step_operators:
  proc: {type: process, max_workers: 3}
  cluster: {type: dask, n_workers: 2, processes: false}
experiment_trackers:
  tracker: {type: mlflow, tracking_uri: "file:///tmp/nowhere-mlruns"}
""")
    stack = Stack.from_yaml(path)
    assert isinstance(stack.alerter, WebhookAlerter)
    assert stack.alerter.url == "http://127.0.0.1:9/hook"
    proc = stack.step_operators["proc"]
    assert isinstance(proc, ProcessStepOperator) and proc.max_workers == 3
    cluster = stack.step_operators["cluster"]
    assert isinstance(cluster, DaskStepOperator)
    assert cluster.n_workers == 2 and cluster.processes is False
    tracker = stack.experiment_trackers["tracker"]
    assert isinstance(tracker, MLflowExperimentTracker)
    assert tracker.tracking_uri == "file:///tmp/nowhere-mlruns"

    run = answer_pipeline.with_options(stack=stack)()
    assert (tmp_path / "conf" / "meta" / "flowcore.db").is_file()
    # The small output is kept inline (in flowcore.db); the artifact store is the YAML's one.
    assert run.steps["answer"].output.uri.startswith("inline:")
    assert Path(stack.artifact_store.root).resolve() == (tmp_path / "conf" / "blobs").resolve()
    assert Client(Stack.from_yaml(path)).get_pipeline_run(run.name).id == run.id


def test_from_yaml_memory_metadata_store(tmp_path: Path) -> None:
    """`metadata_store: memory` keeps runs in the process: no database file appears."""
    path = write(tmp_path / "mem.yaml", "metadata_store: memory\n")
    stack = Stack.from_yaml(path)
    run = answer_pipeline.with_options(stack=stack)()
    assert run.status is RunStatus.COMPLETED
    assert Client(stack).get_pipeline_run(run.name).id == run.id
    assert not list(tmp_path.rglob("*.db"))


# -- choosing the active stack -------------------------------------------------------------


def test_default_stack_lives_under_flowcore_home() -> None:
    """With nothing configured, Client().active_stack is the local stack under FLOWCORE_HOME and
    a plain run is stored there."""
    home = Path(os.environ["FLOWCORE_HOME"])
    active = Client().active_stack
    assert active.root is not None and Path(active.root).resolve() == home.resolve()
    run = answer_pipeline()
    assert (home / "flowcore.db").is_file()
    assert Client().get_pipeline_run(run.name).id == run.id


def test_flowcore_stack_env_var_picks_a_yaml_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """$FLOWCORE_STACK names a stack file: it becomes the active stack and runs land in it."""
    path = write(tmp_path / "env_stack.yaml", """
metadata_store: {path: envstore}
alerter: {type: webhook, url: "http://127.0.0.1:9/env"}
""")
    monkeypatch.setenv("FLOWCORE_STACK", str(path))
    active = Client().active_stack
    assert isinstance(active.alerter, WebhookAlerter) and active.alerter.url.endswith("/env")
    run = answer_pipeline()
    assert (tmp_path / "envstore" / "flowcore.db").is_file()
    assert Client(Stack.from_yaml(path)).get_pipeline_run(run.name).id == run.id
    assert not (Path(os.environ["FLOWCORE_HOME"]) / "flowcore.db").exists()


def test_set_active_stack_beats_env_var_and_with_options_beats_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """set_active_stack() wins over $FLOWCORE_STACK; with_options(stack=...) wins over both;
    set_active_stack(None) falls back to the env var."""
    path = write(tmp_path / "env_stack.yaml", "metadata_store: {path: envstore}\n")
    monkeypatch.setenv("FLOWCORE_STACK", str(path))
    chosen = Stack.in_memory()
    flowcore.set_active_stack(chosen)
    assert Client().active_stack is chosen
    assert flowcore.get_active_stack() is chosen
    run = answer_pipeline()
    assert Client(chosen).get_pipeline_run(run.name).id == run.id
    assert not (tmp_path / "envstore" / "flowcore.db").exists()

    explicit = Stack.in_memory()
    run2 = answer_pipeline.with_options(stack=explicit)()
    assert Client(explicit).get_pipeline_run(run2.name).id == run2.id
    assert [r.name for r in Client(chosen).list_pipeline_runs()] == [run.name]

    flowcore.set_active_stack(None)
    assert Client().active_stack is not chosen
    answer_pipeline()
    assert (tmp_path / "envstore" / "flowcore.db").is_file()


# -- bad stack files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("metadata_store: memory\norchestrator: {type: local}\n", "orchestrator"),
        ("metadata_store: {path: db, colour: red}\n", "colour"),
        ("step_operators:\n  gpu: {type: kubernetes}\n", "kubernetes"),
        ("experiment_trackers:\n  wb: {type: wandb}\n", "wandb"),
        ("alerter: {type: pager, url: 'http://127.0.0.1:9'}\n", "pager"),
        ("step_operators:\n  proc: {type: process, max_wrkers: 2}\n", "max_wrkers"),
        ("a: [1, 2\n", "YAML"),
        ("- just\n- a list\n", "mapping"),
    ],
    ids=["unknown-top-key", "unknown-store-key", "unknown-operator-type",
         "unknown-tracker-type", "unknown-alerter-type", "unknown-component-option",
         "not-yaml", "not-a-mapping"],
)
def test_bad_stack_file_is_config_error_naming_file_and_key(
    tmp_path: Path, text: str, needle: str,
) -> None:
    """A stack file with an unknown key, component type or option, or that is not a YAML mapping,
    is a ConfigError naming the file and what is wrong."""
    path = write(tmp_path / "broken_stack.yaml", text)
    with pytest.raises(ConfigError) as info:
        Stack.from_yaml(path)
    message = str(info.value)
    assert "broken_stack.yaml" in message
    assert needle in message


def test_missing_stack_file_is_config_error_naming_it(tmp_path: Path) -> None:
    """A stack file that does not exist is a ConfigError naming its path."""
    with pytest.raises(ConfigError, match=r"no_such_stack\.yaml"):
        Stack.from_yaml(tmp_path / "no_such_stack.yaml")


def test_bad_env_stack_file_is_config_error_before_any_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broken $FLOWCORE_STACK file fails the run with a ConfigError naming the file, before
    any step body runs."""
    path = write(tmp_path / "bad_env.yaml", "step_operators:\n  x: {type: nope}\n")
    monkeypatch.setenv("FLOWCORE_STACK", str(path))
    calls: list[int] = []

    @step
    def count() -> None:
        calls.append(1)

    @pipeline
    def counting() -> None:
        count()

    with pytest.raises(ConfigError, match=r"bad_env\.yaml"):
        counting()
    assert calls == []


def test_bad_component_value_in_stack_file_names_the_file(tmp_path: Path) -> None:
    """An alerter url that is not http(s) is a ConfigError naming the stack file."""
    path = write(tmp_path / "bad_alerter.yaml", "alerter: {type: webhook, url: 'ftp://x'}\n")
    with pytest.raises(ConfigError) as info:
        Stack.from_yaml(path)
    assert "bad_alerter.yaml" in str(info.value)


# -- components ----------------------------------------------------------------------------


def test_with_components_returns_a_new_stack_sharing_the_stores() -> None:
    """with_components() leaves the original stack unchanged, adds or replaces components, and
    the new stack reads and writes the same stores."""
    base = Stack.in_memory()
    proc = ProcessStepOperator(max_workers=1)
    alerter = WebhookAlerter("http://127.0.0.1:9/a")
    tracker = MLflowExperimentTracker(tracking_uri="file:///tmp/x")
    extended = base.with_components(alerter=alerter, step_operators={"proc": proc},
                                    experiment_trackers={"mlflow_tracker": tracker})
    assert extended is not base
    assert base.alerter is None and base.step_operators == {} and base.experiment_trackers == {}
    assert extended.alerter is alerter
    assert extended.step_operators == {"proc": proc}
    assert extended.experiment_trackers == {"mlflow_tracker": tracker}

    other = ProcessStepOperator(max_workers=2)
    replaced = extended.with_components(step_operators={"proc": other, "more": proc})
    assert replaced.step_operators == {"proc": other, "more": proc}
    assert replaced.alerter is alerter
    assert extended.step_operators == {"proc": proc}

    run = answer_pipeline.with_options(stack=extended)()
    assert Client(base).get_pipeline_run(run.name).id == run.id


@pytest.mark.parametrize("kind", ["step_operator", "experiment_tracker"])
def test_unknown_component_name_is_config_error_before_the_run(tmp_path: Path, kind: str) -> None:
    """A step naming a step operator or experiment tracker the stack lacks is a ConfigError
    naming the pipeline, step and component, raised before any step body runs or a run is
    recorded."""
    stack = Stack.local(tmp_path / "s").with_components(
        step_operators={"proc": ProcessStepOperator(max_workers=1)},
        experiment_trackers={"mlflow_tracker": MLflowExperimentTracker("file:///tmp/x")},
    )
    calls: list[str] = []

    @step(enable_cache=False)
    def first() -> int:
        calls.append("first")
        return 1

    @step(enable_cache=False, **{kind: "vertex_ai"})
    def remote(x: int) -> int:
        calls.append("remote")
        return x

    @pipeline
    def uses_missing_component() -> None:
        remote(first())

    with pytest.raises(ConfigError) as info:
        uses_missing_component.with_options(stack=stack)()
    message = str(info.value)
    assert "vertex_ai" in message and "remote" in message and "uses_missing_component" in message
    assert calls == []
    assert Client(stack).list_pipeline_runs() == []


# -- settings ------------------------------------------------------------------------------


def settings_pipeline(stack: Stack, **step_options: Any) -> Any:
    """A one-step pipeline on `stack` whose step has `step_options` (counting its calls)."""
    calls: list[int] = []

    @step(enable_cache=False, **step_options)
    def configured() -> int:
        calls.append(1)
        return 1

    @pipeline
    def settings_check() -> None:
        configured()

    return settings_check.with_options(stack=stack), calls


@pytest.mark.parametrize(
    ("operator", "key", "value"),
    [
        ("proc", "step_operator", {"cpus": 2}),
        ("cluster", "step_operator", {"resources": "GPU"}),
        ("cluster", "step_operator.dask", {"resources": {"GPU": "many"}}),
        ("cluster", "step_operator.dask", {"priority": "high"}),
        ("cluster", "step_operator.dask", {"memory": "4GB"}),
    ],
    ids=["process-extra-key", "dask-resources-not-mapping", "dask-resource-not-number",
         "dask-priority-not-int", "dask-unknown-key"],
)
def test_bad_step_operator_settings_are_config_error(operator: str, key: str, value: Any) -> None:
    """Step-operator settings are validated by the operator's own pydantic model: a bad value is
    a ConfigError naming the step and the settings key, before the step runs."""
    stack = Stack.in_memory().with_components(step_operators={
        "proc": ProcessStepOperator(max_workers=1),
        "cluster": DaskStepOperator(n_workers=1),  # never started: the error comes first
    })
    p, calls = settings_pipeline(stack, step_operator=operator, settings={key: value})
    with pytest.raises(ConfigError) as info:
        p()
    assert "configured" in str(info.value) and key in str(info.value)
    assert calls == []


@pytest.mark.parametrize(
    "value",
    [{"experiment_name": ["not", "a", "name"]}, {"nested": "sometimes"}, {"experiment": "x"}],
    ids=["name-not-str", "nested-not-bool", "unknown-key"],
)
def test_bad_mlflow_settings_are_config_error(value: dict[str, Any]) -> None:
    """`experiment_tracker.mlflow` settings are validated by MLflowSettings: a bad value is a
    ConfigError naming the step and key, and no body runs."""
    stack = Stack.in_memory().with_components(
        experiment_trackers={"mlflow_tracker": MLflowExperimentTracker("file:///tmp/never")})
    p, calls = settings_pipeline(stack, experiment_tracker="mlflow_tracker",
                                 settings={"experiment_tracker.mlflow": value})
    with pytest.raises(ConfigError) as info:
        p()
    assert "configured" in str(info.value) and "experiment_tracker.mlflow" in str(info.value)
    assert calls == []


def test_good_component_settings_are_accepted() -> None:
    """Valid tracker settings for a tracker the step uses pass validation and the run completes
    (a user tracker with the base settings model sees them)."""
    seen: list[Any] = []

    class RecordingTracker(ExperimentTracker):
        flavor = "recording"

        def track(self, *, pipeline_name: str, run_name: str, step_name: str,
                  settings: Any = None) -> Any:
            seen.append((pipeline_name, step_name, settings))
            return super().track(pipeline_name=pipeline_name, run_name=run_name,
                                 step_name=step_name, settings=settings)

    stack = Stack.in_memory().with_components(
        experiment_trackers={"rec": RecordingTracker()})
    p, calls = settings_pipeline(
        stack, experiment_tracker="rec",
        settings={"experiment_tracker.recording": {"project": "demo"}})
    run = p()
    assert run.status is RunStatus.COMPLETED and calls == [1]
    assert len(seen) == 1
    pipeline_name, step_name, settings = seen[0]
    assert (pipeline_name, step_name) == ("settings_check", "configured")
    assert settings is not None and settings.model_dump() == {"project": "demo"}


def test_settings_for_an_unused_component_log_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Settings for a component type the step does not use, for another flavor than the step's
    component, or for an unknown component type are logged as WARNINGs, not errors."""
    caplog.set_level(logging.WARNING, logger="flowcore")
    stack = Stack.in_memory().with_components(
        step_operators={"proc": ProcessStepOperator(max_workers=1)})

    @step(enable_cache=False, settings={
        "experiment_tracker.mlflow": {"experiment_name": "unused"},
        "docker": {"parent_image": "zenml-io/zenml-cuda:latest"},
    })
    def no_components() -> int:
        return 1

    @pipeline
    def warns() -> None:
        no_components()

    run = warns.with_options(stack=stack)()
    assert run.status is RunStatus.COMPLETED
    assert warnings_about(caplog, "experiment_tracker.mlflow")
    assert warnings_about(caplog, "docker")
    assert all("no_components" in r.getMessage() for r in warnings_about(caplog, "docker"))


def test_settings_for_another_flavor_log_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`step_operator.dask` settings on a step whose operator is a process operator are logged
    as a WARNING (not validated against the Dask model, not an error) and the step runs."""
    caplog.set_level(logging.WARNING, logger="flowcore")
    stack = Stack.in_memory().with_components(
        step_operators={"proc": ProcessStepOperator(max_workers=1)})

    @step(enable_cache=False, step_operator="proc",
          settings={"step_operator.dask": {"resources": "invalid for dask, but unused"}})
    def on_process() -> int:
        return 1

    @pipeline
    def flavor_mismatch() -> None:
        on_process()

    run = flavor_mismatch.with_options(stack=stack)()
    assert run.steps["on_process"].status is StepStatus.COMPLETED
    assert warnings_about(caplog, "step_operator.dask")


def test_orchestrator_synchronous_false_returns_a_run_handle() -> None:
    """`settings={"orchestrator": {"synchronous": False}}` makes a plain call return a RunHandle
    whose result() is the finished run."""

    @step(enable_cache=False)
    def slowish() -> int:
        time.sleep(0.2)
        return 3

    @pipeline(settings={"orchestrator": {"synchronous": False}})
    def in_background() -> None:
        slowish()

    stack = Stack.in_memory()
    handle = in_background.with_options(stack=stack)()
    assert isinstance(handle, RunHandle)
    run = handle.result(timeout=30)
    assert run.status is RunStatus.COMPLETED
    assert run.steps["slowish"].output.load() == 3


def test_unknown_orchestrator_setting_is_config_error() -> None:
    """An orchestrator settings key other than `synchronous` is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="asynchronous"):
        answer_pipeline.with_options(stack=Stack.in_memory(),
                                     settings={"orchestrator": {"asynchronous": True}})()


# -- YAML run configuration ----------------------------------------------------------------


@step
def scale(x: int, factor: int = 1) -> int:
    return x * factor


@step
def total(values: list[int]) -> int:
    return sum(values)


@pipeline
def yaml_pipeline(n: int = 1) -> None:
    total([scale(n, step_name="double", factor=2), scale(n, step_name="triple", factor=3)])


def test_yaml_run_configuration_sets_name_parameters_and_step_parameters(tmp_path: Path) -> None:
    """`run_name`, pipeline `parameters` and `steps.<id>.parameters` in a YAML file shape the run."""
    path = write(tmp_path / "run.yaml", """
run_name: "from_yaml_{run_id}"
parameters: {n: 10}
steps:
  triple:
    parameters: {factor: 5}
""")
    run = yaml_pipeline.with_options(config_path=str(path), stack=Stack.in_memory())()
    assert run.name.startswith("from_yaml_")
    assert run.steps["double"].output.load() == 20
    assert run.steps["triple"].output.load() == 50
    assert run.steps["triple"].config.parameters["factor"] == 5
    assert run.steps["total"].output.load() == 70


def test_yaml_enable_cache_pipeline_and_step_level(tmp_path: Path) -> None:
    """`enable_cache: false` in YAML turns caching off for the run; `steps.<id>.enable_cache`
    beats it for one invocation."""
    stack = Stack.in_memory()
    path = write(tmp_path / "run.yaml", """
enable_cache: false
steps:
  double: {enable_cache: true}
""")
    configured = yaml_pipeline.with_options(config_path=path, stack=stack)
    configured()
    second = configured()
    assert second.steps["double"].status is StepStatus.CACHED
    assert second.steps["triple"].status is StepStatus.COMPLETED
    assert second.steps["total"].status is StepStatus.COMPLETED


def test_yaml_execution_mode_value_string(tmp_path: Path) -> None:
    """`execution_mode: fail_fast` in YAML cancels running siblings of a failing step."""
    path = write(tmp_path / "run.yaml", "execution_mode: fail_fast\nenable_cache: false\n")

    @step
    async def sleeper() -> int:
        import asyncio

        await asyncio.sleep(30)
        return 1

    @step
    async def breaks() -> int:
        import asyncio

        await asyncio.sleep(0.1)
        raise RuntimeError("boom")

    @pipeline
    def modes() -> None:
        sleeper()
        breaks()

    started = time.monotonic()
    with pytest.raises(RunFailedError) as info:
        modes.with_options(config_path=path, stack=Stack.in_memory())()
    assert time.monotonic() - started < 15
    run = info.value.run
    assert run is not None
    assert run.steps["sleeper"].status is StepStatus.STOPPED
    assert run.steps["breaks"].status is StepStatus.FAILED


def test_yaml_bad_execution_mode_is_config_error(tmp_path: Path) -> None:
    """An execution_mode that is no ExecutionMode value is a ConfigError naming the key."""
    path = write(tmp_path / "run.yaml", "execution_mode: fast\n")
    with pytest.raises(ConfigError, match="execution_mode"):
        answer_pipeline.with_options(config_path=path, stack=Stack.in_memory())()


def test_yaml_synchronous_false_returns_a_run_handle(tmp_path: Path) -> None:
    """`synchronous: false` in YAML makes a plain call return a RunHandle."""
    path = write(tmp_path / "run.yaml", "synchronous: false\n")
    handle = answer_pipeline.with_options(config_path=path, stack=Stack.in_memory())()
    assert isinstance(handle, RunHandle)
    assert handle.result(timeout=30).status is RunStatus.COMPLETED


def test_yaml_step_retry(tmp_path: Path) -> None:
    """`steps.<id>.retry` gives a step retries it did not have in code."""
    path = write(tmp_path / "run.yaml", """
steps:
  flaky: {retry: {max_retries: 2, delay: 0}}
""")

    @step(enable_cache=False)
    def flaky() -> int:
        attempt = get_step_context().step_run.attempt
        if attempt < 3:
            raise RuntimeError(f"attempt {attempt}")
        return attempt

    @pipeline
    def retried() -> None:
        flaky()

    run = retried.with_options(config_path=path, stack=Stack.in_memory())()
    assert run.steps["flaky"].status is StepStatus.COMPLETED
    assert run.steps["flaky"].attempts == 3
    with pytest.raises(RunFailedError):
        retried.with_options(stack=Stack.in_memory())()


def test_yaml_step_operator_and_settings(tmp_path: Path) -> None:
    """`steps.<id>.step_operator` moves a step to a process operator (another pid), and bad
    `steps.<id>.settings` for it are a ConfigError naming the step and key."""
    stack = Stack.in_memory().with_components(
        step_operators={"proc": ProcessStepOperator(max_workers=1)})

    @step(enable_cache=False)
    def where() -> int:
        import os as _os

        return _os.getpid()

    @pipeline
    def placed() -> None:
        where()

    good = write(tmp_path / "good.yaml", "steps:\n  where: {step_operator: proc}\n")
    run = placed.with_options(config_path=good, stack=stack)()
    assert run.steps["where"].config.step_operator == "proc"
    assert run.steps["where"].output.load() != os.getpid()

    bad = write(tmp_path / "bad.yaml", """
steps:
  where:
    step_operator: proc
    settings: {step_operator: {gpus: 1}}
""")
    with pytest.raises(ConfigError) as info:
        placed.with_options(config_path=bad, stack=stack)()
    assert "where" in str(info.value) and "step_operator" in str(info.value)


def test_yaml_pipeline_settings_are_validated_for_each_step(tmp_path: Path) -> None:
    """Top-level YAML `settings` apply to every step: bad tracker settings for a step that uses
    the tracker are a ConfigError naming that step."""
    stack = Stack.in_memory().with_components(
        experiment_trackers={"mlflow_tracker": MLflowExperimentTracker("file:///tmp/never")})

    @step(experiment_tracker="mlflow_tracker")
    def tracked() -> int:
        return 1

    @pipeline
    def tracked_pipeline() -> None:
        tracked()

    path = write(tmp_path / "run.yaml",
                 "settings:\n  experiment_tracker.mlflow: {nested: [1, 2]}\n")
    with pytest.raises(ConfigError) as info:
        tracked_pipeline.with_options(config_path=path, stack=stack)()
    assert "tracked" in str(info.value) and "experiment_tracker.mlflow" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("enable_caching: false\n", "enable_caching"),
        ("steps:\n  double: {cache: false}\n", "cache"),
        ("steps:\n  double: {retry: {max_retry: 2}}\n", "max_retry"),
        ("steps:\n  quadruple: {enable_cache: false}\n", "quadruple"),
        ("steps:\n  double: {parameters: {facter: 2}}\n", "facter"),
    ],
    ids=["top-level", "step-block", "retry-block", "unknown-invocation", "unknown-parameter"],
)
def test_yaml_unknown_keys_are_config_error_naming_key(tmp_path: Path, text: str, key: str) -> None:
    """An unknown key anywhere in a run configuration (or an unknown invocation or parameter) is
    a ConfigError naming the key, raised before any run is recorded."""
    stack = Stack.in_memory()
    path = write(tmp_path / "my_run_config.yaml", text)
    with pytest.raises(ConfigError) as info:
        yaml_pipeline.with_options(config_path=path, stack=stack)()
    assert key in str(info.value)
    assert Client(stack).list_pipeline_runs() == []


@pytest.mark.parametrize(
    "text", ["enable_caching: false\n", "steps:\n  double: {cache: false}\n"],
    ids=["top-level", "step-block"])
def test_yaml_unknown_key_error_names_the_file(tmp_path: Path, text: str) -> None:
    """The ConfigError for an unknown key names the configuration file."""
    path = write(tmp_path / "my_run_config.yaml", text)
    with pytest.raises(ConfigError, match=r"my_run_config\.yaml"):
        yaml_pipeline.with_options(config_path=path, stack=Stack.in_memory())()


def test_yaml_file_that_is_missing_or_not_yaml_is_config_error(tmp_path: Path) -> None:
    """A missing configuration file or one that is not YAML is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"absent\.yaml"):
        answer_pipeline.with_options(config_path=tmp_path / "absent.yaml",
                                     stack=Stack.in_memory())()
    broken = write(tmp_path / "broken.yaml", "run_name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        answer_pipeline.with_options(config_path=broken, stack=Stack.in_memory())()


# -- precedence: decorator < configure() < YAML < with_options() ----------------------------


def named_pipeline(**decorator: Any) -> Any:
    """A fresh one-step pipeline with the given decorator options."""

    @step
    def body() -> int:
        return 1

    @pipeline(**decorator)
    def layered() -> None:
        body()

    return layered


def test_precedence_configure_beats_decorator() -> None:
    """configure() overrides an option set in the decorator."""
    p = named_pipeline(run_name="decorator_{run_id}")
    p.configure(run_name="configure_{run_id}")
    assert p.with_options(stack=Stack.in_memory())().name.startswith("configure_")


def test_precedence_yaml_beats_configure(tmp_path: Path) -> None:
    """A YAML file overrides configure() (and the decorator)."""
    path = write(tmp_path / "run.yaml", "run_name: yaml_{run_id}\n")
    p = named_pipeline(run_name="decorator_{run_id}")
    p.configure(run_name="configure_{run_id}", config_path=str(path))
    assert p.with_options(stack=Stack.in_memory())().name.startswith("yaml_")


def test_precedence_with_options_beats_yaml(tmp_path: Path) -> None:
    """with_options() keywords override the YAML file, whichever with_options call names the
    file."""
    path = write(tmp_path / "run.yaml", "run_name: yaml_{run_id}\n")
    p = named_pipeline(run_name="decorator_{run_id}")
    p.configure(run_name="configure_{run_id}")
    stack = Stack.in_memory()
    one = p.with_options(config_path=path, run_name="keyword_a_{run_id}", stack=stack)()
    assert one.name.startswith("keyword_a_")
    two = p.with_options(run_name="keyword_b_{run_id}").with_options(config_path=path,
                                                                     stack=stack)()
    assert two.name.startswith("keyword_b_")


@pytest.mark.parametrize(
    ("layers", "cached"),
    [
        ({"decorator": False}, False),
        ({"decorator": False, "configure": True}, True),
        ({"decorator": False, "configure": True, "yaml": False}, False),
        ({"decorator": False, "configure": True, "yaml": False, "with_options": True}, True),
        ({"decorator": True, "yaml": False}, False),
        ({"yaml": True, "with_options": False}, False),
    ],
    ids=["decorator", "configure>decorator", "yaml>configure", "with_options>yaml",
         "yaml>decorator", "with_options>yaml-true"],
)
def test_precedence_of_enable_cache(tmp_path: Path, layers: dict[str, bool], cached: bool) -> None:
    """Pipeline-level enable_cache is resolved decorator < configure() < YAML < with_options():
    a second identical run is CACHED exactly when the winning layer says True."""
    decorator = {"enable_cache": layers["decorator"]} if "decorator" in layers else {}
    p = named_pipeline(**decorator)
    if "configure" in layers:
        p.configure(enable_cache=layers["configure"])
    options: dict[str, Any] = {"stack": Stack.in_memory()}
    if "yaml" in layers:
        options["config_path"] = write(tmp_path / "run.yaml",
                                       f"enable_cache: {str(layers['yaml']).lower()}\n")
    if "with_options" in layers:
        options["enable_cache"] = layers["with_options"]
    configured = p.with_options(**options)
    configured()
    second = configured()
    expected = StepStatus.CACHED if cached else StepStatus.COMPLETED
    assert second.steps["body"].status is expected


def test_precedence_of_execution_mode_with_options_beats_yaml(tmp_path: Path) -> None:
    """with_options(execution_mode=...) beats `execution_mode` in the YAML file."""
    path = write(tmp_path / "run.yaml", "execution_mode: fail_fast\nenable_cache: false\n")

    @step
    async def sleeper() -> int:
        import asyncio

        await asyncio.sleep(0.5)
        return 1

    @step
    def breaks() -> int:
        raise RuntimeError("boom")

    @pipeline
    def modes() -> None:
        sleeper()
        breaks()

    with pytest.raises(RunFailedError) as info:
        modes.with_options(config_path=path, stack=Stack.in_memory(),
                           execution_mode=ExecutionMode.CONTINUE_ON_FAILURE)()
    run = info.value.run
    assert run is not None
    assert run.steps["sleeper"].status is StepStatus.COMPLETED


def test_yaml_settings_are_overridden_key_by_key_by_with_options(tmp_path: Path) -> None:
    """with_options(settings=...) beats YAML `settings` for the keys it names and keeps the
    YAML's other keys."""
    path = write(tmp_path / "run.yaml", """
settings:
  orchestrator: {synchronous: false}
  experiment_tracker.mlflow: {experiment_name: from_yaml}
""")
    seen: list[Any] = []

    class RecordingTracker(ExperimentTracker):
        flavor = "mlflow"  # pretends to be MLflow so the mlflow settings key applies

        SETTINGS = MLflowExperimentTracker.SETTINGS

        def track(self, *, pipeline_name: str, run_name: str, step_name: str,
                  settings: Any = None) -> Any:
            seen.append(settings.experiment_name)
            return super().track(pipeline_name=pipeline_name, run_name=run_name,
                                 step_name=step_name, settings=settings)

    stack = Stack.in_memory().with_components(experiment_trackers={"t": RecordingTracker()})

    @step(enable_cache=False, experiment_tracker="t")
    def tracked() -> int:
        return 1

    @pipeline
    def with_settings() -> None:
        tracked()

    handle = with_settings.with_options(config_path=path, stack=stack)()
    assert isinstance(handle, RunHandle)  # the YAML orchestrator setting applied
    handle.result(timeout=30)
    run = with_settings.with_options(
        config_path=path, stack=stack,
        settings={"experiment_tracker.mlflow": {"experiment_name": "from_keyword"}})()
    assert isinstance(run, RunHandle)  # YAML's orchestrator key kept
    run.result(timeout=30)
    assert seen == ["from_yaml", "from_keyword"]


def test_configure_enable_cache_artifact_metadata_and_settings() -> None:
    """The seed's `configure(enable_cache=False, enable_artifact_metadata=True, settings={...})`
    works: the run completes and is not cached the second time."""
    p = named_pipeline()
    same = p.configure(
        enable_cache=False,
        enable_artifact_metadata=True,
        settings={"docker": {"parent_image": "zenml-io/zenml-cuda:latest"}},
    )
    assert same is p
    stack = Stack.in_memory()
    first = p.with_options(stack=stack)()
    second = p.with_options(stack=stack)()
    assert first.status is RunStatus.COMPLETED
    assert second.steps["body"].status is StepStatus.COMPLETED


def test_configure_unknown_option_is_config_error() -> None:
    """configure() with an unknown option is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="enable_caching"):
        named_pipeline().configure(enable_caching=False)


def test_step_operator_base_class_is_usable_for_user_operators() -> None:
    """A user StepOperator subclass registered with with_components runs the step body."""
    used: list[str] = []

    class CountingOperator(StepOperator):
        flavor = "counting"

        async def run(self, func: Any, kwargs: dict[str, Any], *, is_async: bool,
                      settings: Any = None) -> Any:
            used.append("run")
            result = func(**kwargs)
            if is_async:
                result = await result
            return result

    stack = Stack.in_memory().with_components(step_operators={"mine": CountingOperator()})

    @step(step_operator="mine", enable_cache=False)
    async def doubled(x: int) -> int:
        return 2 * x

    @pipeline
    def user_operator() -> None:
        doubled(21)

    run = user_operator.with_options(stack=stack)()
    assert used == ["run"]
    assert run.steps["doubled"].output.load() == 42


def test_yaml_step_block_beats_the_step_decorator(tmp_path: Path) -> None:
    """`steps.<id>.enable_cache: true` in YAML beats `@step(enable_cache=False)`."""

    @step(enable_cache=False)
    def uncached_in_code() -> int:
        return 1

    @pipeline
    def step_level() -> None:
        uncached_in_code()

    stack = Stack.in_memory()
    path = write(tmp_path / "run.yaml", "steps:\n  uncached_in_code: {enable_cache: true}\n")
    step_level.with_options(stack=stack)()
    assert (step_level.with_options(stack=stack)().steps["uncached_in_code"].status
            is StepStatus.COMPLETED)
    step_level.with_options(config_path=path, stack=stack)()
    second = step_level.with_options(config_path=path, stack=stack)()
    assert second.steps["uncached_in_code"].status is StepStatus.CACHED
