"""flowcore: an asyncio-native engine that runs ML and data pipelines as dependency graphs.

Write steps and pipelines the way ZenML users do (`@step`, `@pipeline`), and run them inside
your own async application (`await pipeline.run()`), in the background (`pipeline.submit()`),
or from a script (`pipeline()`).
"""

from __future__ import annotations

from flowcore._engine._handle import RunHandle
from flowcore._graph import Graph
from flowcore._logging import enable_console_logging
from flowcore._models import (
    ArtifactVersion,
    ErrorInfo,
    PipelineRun,
    RunStatus,
    StepRun,
    StepStatus,
)
from flowcore._pipeline import Pipeline, pipeline
from flowcore._progress import progress
from flowcore._step import OutputHandle, Step, step, unmapped
from flowcore.client import AsyncClient, Client
from flowcore.config import CachePolicy, ExecutionMode, StepRetryConfig
from flowcore.context import StepContext, get_step_context
from flowcore.exceptions import (
    ArtifactLoadError,
    ConfigError,
    FlowcoreError,
    MaterializerError,
    PipelineDefinitionError,
    RunFailedError,
    RunNameConflictError,
    RunNotFoundError,
    RunStateError,
    RunTimeoutError,
    StepContextError,
    StepInputError,
    StepOutputError,
    StepTimeoutError,
    StoreError,
)
from flowcore.materializers import Materializer
from flowcore.stack import Stack, get_active_stack, set_active_stack

__version__ = "0.1.0"

__all__ = [
    "ArtifactLoadError",
    "ArtifactVersion",
    "AsyncClient",
    "CachePolicy",
    "Client",
    "ConfigError",
    "ErrorInfo",
    "ExecutionMode",
    "FlowcoreError",
    "Graph",
    "Materializer",
    "MaterializerError",
    "OutputHandle",
    "Pipeline",
    "PipelineDefinitionError",
    "PipelineRun",
    "RunFailedError",
    "RunHandle",
    "RunNameConflictError",
    "RunNotFoundError",
    "RunStateError",
    "RunStatus",
    "RunTimeoutError",
    "Stack",
    "Step",
    "StepContext",
    "StepContextError",
    "StepInputError",
    "StepOutputError",
    "StepRetryConfig",
    "StepRun",
    "StepStatus",
    "StepTimeoutError",
    "StoreError",
    "enable_console_logging",
    "get_active_stack",
    "get_step_context",
    "pipeline",
    "progress",
    "set_active_stack",
    "step",
    "unmapped",
]
