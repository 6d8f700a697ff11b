"""MLflowExperimentTracker (API.md section 9, the seed's "Step Settings"): `mlflow.log_metric`
inside a tracked step lands in an MLflow run named after the pipeline run and step, in the
experiment named by the step's settings (default: the pipeline name).

mlflow-skinny 3.x refuses its local file store unless MLFLOW_ALLOW_FILE_STORE=true, and its
sqlite backend needs SQLAlchemy, which mlflow-skinny does not install; these tests therefore use
a `file://` tracking URI under tmp_path with MLFLOW_ALLOW_FILE_STORE=true."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowcore import RunFailedError, RunStatus, Stack, StepStatus, pipeline, step
from flowcore.stack import MLflowExperimentTracker

mlflow = pytest.importorskip("mlflow")
MlflowClient = mlflow.tracking.MlflowClient


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh file-store tracking URI under tmp_path (file store explicitly allowed)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    yield (tmp_path / "mlruns").as_uri()
    while mlflow.active_run() is not None:
        mlflow.end_run()


def tracked_stack(uri: str | None) -> Stack:
    """An in-memory stack with an MLflow tracker named "mlflow_tracker"."""
    return Stack.in_memory().with_components(
        experiment_trackers={"mlflow_tracker": MLflowExperimentTracker(tracking_uri=uri)})


def mlflow_runs(uri: str, experiment: str) -> dict[str, Any]:
    """The MLflow runs of `experiment`, by run name (empty if the experiment does not exist)."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


@step(experiment_tracker="mlflow_tracker", enable_cache=False,
      settings={"experiment_tracker.mlflow": {"experiment_name": "custom_experiment",
                                              "tags": {"team": "ml"}}})
def train_sync(lr: float) -> float:
    accuracy = 0.5 + lr
    mlflow.log_param("lr", lr)
    mlflow.log_metric("accuracy", accuracy)
    return accuracy


@step(experiment_tracker="mlflow_tracker", enable_cache=False)
async def evaluate_async(accuracy: float) -> float:
    await asyncio.sleep(0.01)
    mlflow.log_metric("eval_accuracy", accuracy - 0.1)
    return accuracy - 0.1


@step(enable_cache=False)
def untracked(x: float) -> float:
    return x


@pipeline
def mlflow_pipeline(lr: float = 0.25) -> None:
    acc = train_sync(lr)
    untracked(evaluate_async(acc))


def test_sync_step_metric_lands_in_run_named_after_pipeline_run_and_step(tracking_uri: str) -> None:
    """log_metric in a sync step lands in an MLflow run named "<run name>.<step>" in the
    experiment named by the step's `experiment_tracker.mlflow` settings, with flowcore's tags and
    the settings' tags."""
    run = mlflow_pipeline.with_options(stack=tracked_stack(tracking_uri))(lr=0.25)
    assert run.status is RunStatus.COMPLETED
    runs = mlflow_runs(tracking_uri, "custom_experiment")
    name = f"{run.name}.train_sync"
    assert set(runs) == {name}
    ml_run = runs[name]
    assert ml_run.data.metrics == {"accuracy": 0.75}
    assert ml_run.data.params == {"lr": "0.25"}
    tags = ml_run.data.tags
    assert tags["flowcore.pipeline"] == "mlflow_pipeline"
    assert tags["flowcore.run"] == run.name
    assert tags["flowcore.step"] == "train_sync"
    assert tags["team"] == "ml"
    assert ml_run.info.status == "FINISHED"


def test_async_step_metric_lands_in_the_pipeline_named_experiment(tracking_uri: str) -> None:
    """log_metric in an async step lands in the experiment named after the pipeline when the step
    has no experiment_name setting; an untracked step opens no MLflow run."""
    run = mlflow_pipeline.with_options(stack=tracked_stack(tracking_uri))(lr=0.25)
    runs = mlflow_runs(tracking_uri, "mlflow_pipeline")
    assert set(runs) == {f"{run.name}.evaluate_async"}
    assert runs[f"{run.name}.evaluate_async"].data.metrics == {"eval_accuracy": 0.65}
    assert mlflow.active_run() is None


def test_each_pipeline_run_gets_its_own_mlflow_runs(tracking_uri: str) -> None:
    """Two pipeline runs make two MLflow runs per tracked step, each holding its own metrics."""
    stack = tracked_stack(tracking_uri)
    first = mlflow_pipeline.with_options(stack=stack)(lr=0.1)
    second = mlflow_pipeline.with_options(stack=stack)(lr=0.3)
    runs = mlflow_runs(tracking_uri, "custom_experiment")
    assert runs[f"{first.name}.train_sync"].data.metrics["accuracy"] == pytest.approx(0.6)
    assert runs[f"{second.name}.train_sync"].data.metrics["accuracy"] == pytest.approx(0.8)


def test_tracker_experiment_name_is_the_default_for_its_steps(tracking_uri: str) -> None:
    """MLflowExperimentTracker(experiment_name=...) names the experiment of steps without an
    experiment_name setting."""
    stack = Stack.in_memory().with_components(experiment_trackers={
        "mlflow_tracker": MLflowExperimentTracker(tracking_uri=tracking_uri,
                                                  experiment_name="tracker_default")})
    run = mlflow_pipeline.with_options(stack=stack)(lr=0.25)
    assert set(mlflow_runs(tracking_uri, "tracker_default")) == {f"{run.name}.evaluate_async"}
    assert set(mlflow_runs(tracking_uri, "custom_experiment")) == {f"{run.name}.train_sync"}


def test_failing_tracked_step_ends_its_mlflow_run_failed(tracking_uri: str) -> None:
    """A tracked step that raises leaves an MLflow run with the metrics logged before the error,
    marked FAILED, and no MLflow run stays active."""

    @step(experiment_tracker="mlflow_tracker", enable_cache=False)
    def diverges() -> float:
        mlflow.log_metric("loss", 1e9)
        raise FloatingPointError("loss diverged")

    @pipeline
    def diverging() -> None:
        diverges()

    with pytest.raises(RunFailedError) as info:
        diverging.with_options(stack=tracked_stack(tracking_uri))()
    run = info.value.run
    assert run is not None
    ml_run = mlflow_runs(tracking_uri, "diverging")[f"{run.name}.diverges"]
    assert ml_run.data.metrics == {"loss": 1e9}
    assert ml_run.info.status == "FAILED"
    assert mlflow.active_run() is None


def test_concurrent_sync_tracked_steps_keep_their_metrics_apart(tracking_uri: str) -> None:
    """Two sync tracked steps running at the same time (worker threads) each log into their own
    MLflow run."""

    @step(experiment_tracker="mlflow_tracker", enable_cache=False)
    def worker(i: int) -> int:
        mlflow.log_metric("before", i)
        time.sleep(0.3)
        mlflow.log_metric("after", i)
        return i

    @pipeline
    def two_sync() -> None:
        worker(1, step_name="one")
        worker(2, step_name="two")

    run = two_sync.with_options(stack=tracked_stack(tracking_uri))()
    runs = mlflow_runs(tracking_uri, "two_sync")
    assert runs[f"{run.name}.one"].data.metrics == {"before": 1.0, "after": 1.0}
    assert runs[f"{run.name}.two"].data.metrics == {"before": 2.0, "after": 2.0}


def test_concurrent_async_tracked_steps_keep_their_metrics_apart(tracking_uri: str) -> None:
    """Two async tracked steps awaiting at the same time on one loop each log into their own
    MLflow run."""

    @step(experiment_tracker="mlflow_tracker", enable_cache=False)
    async def aworker(i: int) -> int:
        mlflow.log_metric("before", i)
        await asyncio.sleep(0.3)
        mlflow.log_metric("after", i)
        return i

    @pipeline
    def two_async() -> None:
        aworker(1, step_name="one")
        aworker(2, step_name="two")

    run = two_async.with_options(stack=tracked_stack(tracking_uri))()
    assert run.steps["one"].status is StepStatus.COMPLETED
    assert run.steps["two"].status is StepStatus.COMPLETED
    runs = mlflow_runs(tracking_uri, "two_async")
    assert runs[f"{run.name}.one"].data.metrics == {"before": 1.0, "after": 1.0}
    assert runs[f"{run.name}.two"].data.metrics == {"before": 2.0, "after": 2.0}


def test_default_tracking_uri_works_out_of_the_box(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflowExperimentTracker() with no tracking_uri logs under $FLOWCORE_HOME without any
    extra environment setup."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)

    @step(experiment_tracker="mlflow_tracker", enable_cache=False)
    def logs() -> int:
        mlflow.log_metric("x", 1.0)
        return 1

    @pipeline
    def default_uri() -> None:
        logs()

    run = default_uri.with_options(stack=tracked_stack(None))()
    assert run.steps["logs"].status is StepStatus.COMPLETED


def test_default_tracking_uri_is_under_flowcore_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no tracking_uri (and the file store allowed) runs are logged under
    $FLOWCORE_HOME/mlruns."""
    import os

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")

    @step(experiment_tracker="mlflow_tracker", enable_cache=False)
    def logs() -> int:
        mlflow.log_metric("x", 1.0)
        return 1

    @pipeline
    def default_home() -> None:
        logs()

    run = default_home.with_options(stack=tracked_stack(None))()
    uri = (Path(os.environ["FLOWCORE_HOME"]) / "mlruns").absolute().as_uri()
    assert mlflow_runs(uri, "default_home")[f"{run.name}.logs"].data.metrics == {"x": 1.0}
