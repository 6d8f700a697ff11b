"""The flowcore error tree: every error flowcore raises derives from `FlowcoreError`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowcore._models import PipelineRun

__all__ = [
    "ArtifactLoadError",
    "CacheKeyError",
    "ConfigError",
    "FlowcoreError",
    "MaterializerError",
    "PipelineDefinitionError",
    "RunFailedError",
    "RunNameConflictError",
    "RunNotFoundError",
    "RunStateError",
    "RunTimeoutError",
    "StepContextError",
    "StepInputError",
    "StepOperatorError",
    "StepOutputError",
    "StepTimeoutError",
    "StoreError",
    "SyncCallOnLoopError",
    "UsageError",
]


class FlowcoreError(Exception):
    """Base class of every error flowcore raises."""


class PipelineDefinitionError(FlowcoreError):
    """A pipeline or step is defined wrongly (duplicate ID, unknown `after`, cycle, bad hook)."""


class ConfigError(FlowcoreError):
    """A configuration value, settings block, YAML file or stack component is invalid."""


class StepInputError(FlowcoreError):
    """A step received an input of the wrong type, or a missing or unexpected argument."""


class StepOutputError(FlowcoreError):
    """A step returned a value that does not match its declared outputs."""


class StepContextError(FlowcoreError):
    """`get_step_context()` was called outside a running step or its hooks."""


class StepTimeoutError(FlowcoreError):
    """A step exceeded its `timeout` on its last attempt."""


class RunFailedError(FlowcoreError):
    """A pipeline run ended with at least one failed step.

    Attributes:
        run: the finished `PipelineRun`; `__cause__` is the first failed step's exception.
    """

    def __init__(self, message: str, run: PipelineRun | None = None) -> None:
        super().__init__(message)
        self.run = run

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.run))


class RunNameConflictError(FlowcoreError):
    """A run name is already used in the metadata store."""


class ArtifactLoadError(FlowcoreError):
    """A stored artifact cannot be loaded (missing, tampered with, or wrong Python version)."""


class MaterializerError(FlowcoreError):
    """No materializer can store an output, or a materializer failed."""


class StoreError(FlowcoreError):
    """The metadata or artifact store cannot be opened, read or written."""


class RunStateError(FlowcoreError):
    """A run is in the wrong state for the request (resuming a run that is still RUNNING)."""


class RunTimeoutError(FlowcoreError):
    """A run passed its deadline (`timeout=` of the pipeline) and was cancelled."""


class SyncCallOnLoopError(FlowcoreError, RuntimeError):
    """A synchronous run was started on a thread whose event loop is running."""


class CacheKeyError(FlowcoreError):
    """A value has no stable canonical form (the step is then not cached, never an error of
    the run: flowcore catches it)."""


class RunNotFoundError(FlowcoreError, KeyError):
    """No run with the given name or id exists in the metadata store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StepOperatorError(FlowcoreError):
    """A step operator could not run a step (a worker process died, a cluster went away)."""


class UsageError(FlowcoreError):
    """A mistake in the command line: reported as one line, exit code 2."""


class _WriteFailed(Exception):
    """Internal to the SQLite store: a write of a batch failed on the fast path (the batch is
    replayed with savepoints); never reaches users."""
