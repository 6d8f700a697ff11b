"""Experiment trackers: a context that is active while a step body runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ExperimentTracker",
    "ExperimentTrackerSettings",
    "MLflowExperimentTracker",
    "MLflowSettings",
]


class ExperimentTrackerSettings(BaseModel):
    """Settings a step may pass to its tracker (`settings={"experiment_tracker": {...}}`)."""

    model_config = ConfigDict(extra="allow")


class ExperimentTracker:
    """Base class: `track()` is entered around every attempt of a step body."""

    flavor: ClassVar[str] = "base"
    SETTINGS: ClassVar[type[BaseModel]] = ExperimentTrackerSettings
    thread_bound: ClassVar[bool] = False

    @contextlib.contextmanager
    def track(
        self, *, pipeline_name: str, run_name: str, step_name: str, settings: Any = None
    ) -> Iterator[None]:
        """Context active while the step body runs."""
        yield

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class MLflowSettings(ExperimentTrackerSettings):
    """`settings={"experiment_tracker.mlflow": {...}}`."""

    model_config = ConfigDict(extra="forbid")

    experiment_name: str | None = None
    nested: bool = False
    tags: dict[str, str] = {}


class MLflowExperimentTracker(ExperimentTracker):
    """Opens an MLflow run (named after the pipeline run and step) around each step body, so
    `mlflow.log_metric(...)` inside the step lands there. Needs `pip install flowcore[mlflow]`.

    With no `tracking_uri` it logs to a local store under `$FLOWCORE_HOME/mlruns`.
    """

    flavor: ClassVar[str] = "mlflow"
    SETTINGS: ClassVar[type[BaseModel]] = MLflowSettings
    # MLflow's active run lives in a thread-local stack: async bodies on one loop take turns.
    thread_bound: ClassVar[bool] = True

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name

    def __repr__(self) -> str:
        return f"<MLflowExperimentTracker {self.tracking_uri or 'local'}>"

    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        import os
        from pathlib import Path

        home = Path(os.environ.get("FLOWCORE_HOME") or ".flowcore").absolute()
        (home / "mlruns").mkdir(parents=True, exist_ok=True)
        # MLflow 3 refuses a file store unless asked; the local default is one on purpose
        # (mlflow-skinny has no SQLAlchemy for a sqlite:// store).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return (home / "mlruns").as_uri()

    @contextlib.contextmanager
    def track(
        self, *, pipeline_name: str, run_name: str, step_name: str, settings: Any = None
    ) -> Iterator[None]:
        try:
            import mlflow
        except ImportError as exc:
            from flowcore.exceptions import ConfigError

            raise ConfigError(
                "MLflowExperimentTracker needs mlflow: pip install 'flowcore[mlflow]'"
            ) from exc
        opts = settings if isinstance(settings, MLflowSettings) else MLflowSettings()
        mlflow.set_tracking_uri(self.resolved_tracking_uri())
        mlflow.set_experiment(opts.experiment_name or self.experiment_name or pipeline_name)
        tags = {"flowcore.pipeline": pipeline_name, "flowcore.run": run_name,
                "flowcore.step": step_name, **opts.tags}
        with mlflow.start_run(run_name=f"{run_name}.{step_name}", nested=opts.nested, tags=tags):
            yield
