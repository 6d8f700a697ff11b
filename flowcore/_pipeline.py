"""`@pipeline`: the Pipeline object, its options, compiling and starting runs."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, overload

from flowcore._compile import compile_graph, current_recorder, recording
from flowcore._graph import Graph
from flowcore._step import check_options
from flowcore.config import (
    ExecutionMode,
    RunConfigFile,
    load_run_config,
    validate_pipeline_options,
)
from flowcore.exceptions import ConfigError, SyncCallOnLoopError

if TYPE_CHECKING:
    from flowcore._engine._launch import RunHandle
    from flowcore._models import PipelineRun

# SyncCallOnLoopError is defined in flowcore.exceptions and re-exported for older imports.
__all__ = ["PIPELINE_OPTIONS", "Pipeline", "SyncCallOnLoopError", "pipeline"]

PIPELINE_OPTIONS = frozenset({
    "cache_policy", "enable_cache", "execution_mode", "on_start", "on_success", "on_failure",
    "on_end", "retry",
    "max_concurrency", "settings", "run_name", "config_path", "synchronous", "stack",
    "substitutions", "clock", "enable_artifact_metadata", "name", "extra", "model",
    "capture_logs", "timeout", "resume_from", "log_limit",
})


def _mode(value: Any, where: str) -> ExecutionMode:
    try:
        return ExecutionMode(value)
    except ValueError:
        names = ", ".join(m.value for m in ExecutionMode)
        raise ConfigError(f"{where}: execution_mode {value!r} is not one of {names}") from None


class Pipeline:
    """A function turned into a pipeline by `@pipeline`.

    The function runs once per run at compile time with real parameter values; the step calls
    inside it become the graph.
    """

    def __init__(self, func: Callable[..., Any], options: dict[str, Any] | None = None) -> None:
        opts = dict(options or {})
        func_name = getattr(func, "__name__", "pipeline")
        check_options(opts, PIPELINE_OPTIONS, f"pipeline '{func_name}'")
        validate_pipeline_options(opts, opts.get("name") or func_name)
        self.func = func
        self.name: str = opts.pop("name", None) or getattr(func, "__name__", "pipeline")
        self._options = opts  # decorator + configure()
        self._run_options: dict[str, Any] = {}  # with_options(): beats the YAML file
        functools.update_wrapper(self, func)

    def __repr__(self) -> str:
        return f"<Pipeline {self.name}>"

    # -- configuration ---------------------------------------------------------------------

    def configure(self, **options: Any) -> Pipeline:
        """Change options in place; returns the same pipeline."""
        check_options(options, PIPELINE_OPTIONS, f"pipeline '{self.name}'")
        validate_pipeline_options(options, self.name)
        if "name" in options:
            self.name = options.pop("name")
        self._options.update(options)
        return self

    def with_options(self, **options: Any) -> Pipeline:
        """Return a configured copy (these options beat a YAML `config_path`)."""
        check_options(options, PIPELINE_OPTIONS, f"pipeline '{self.name}'")
        validate_pipeline_options(options, self.name)
        clone = copy.copy(self)
        clone._options = dict(self._options)
        clone._run_options = dict(self._run_options)
        if "name" in options:
            clone.name = options.pop("name")
        clone._run_options.update(options)
        return clone

    def _resolved_options(self) -> tuple[dict[str, Any], RunConfigFile | None]:
        merged = {**self._options, **self._run_options}
        run_config = None
        path = merged.get("config_path")
        if path:
            run_config = load_run_config(path)
            from_yaml = run_config.model_dump(
                exclude_none=True, exclude={"steps", "parameters", "settings", "substitutions"}
            )
            merged = {**self._options, **from_yaml, **self._run_options}
            if run_config.settings:
                merged["settings"] = {**run_config.settings, **(merged.get("settings") or {})}
                if "settings" in self._run_options:
                    merged["settings"] = {**run_config.settings, **self._run_options["settings"]}
            if run_config.substitutions:
                merged["substitutions"] = {
                    **run_config.substitutions, **(merged.get("substitutions") or {})
                }
        return merged, run_config

    # -- compiling -------------------------------------------------------------------------

    def compile(self, *args: Any, **params: Any) -> Graph:
        """Run the pipeline function with these parameters and return the checked graph."""
        options, run_config = self._resolved_options()
        return self._compile(options, run_config, args, params)

    def _compile(
        self, options: Mapping[str, Any], run_config: RunConfigFile | None,
        args: tuple[Any, ...], params: Mapping[str, Any],
    ) -> Graph:
        call_params = dict(run_config.parameters) if run_config else {}
        call_params.update(params)
        if "execution_mode" in options:
            _mode(options["execution_mode"], f"pipeline '{self.name}'")
        with recording(self.name, self.func) as recorder:
            try:
                outputs = self.func(*args, **call_params)
            except TypeError as exc:
                if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                    raise ConfigError(f"pipeline '{self.name}': {exc}") from None
                raise
        return compile_graph(self.name, recorder, options, run_config, call_params, outputs)

    def _inline(self, args: tuple[Any, ...], params: Mapping[str, Any]) -> Any:
        """Composition: run this pipeline's function inside the calling pipeline's recording,
        so its steps join that graph; returns what the function returns.

        Raises:
            PipelineDefinitionError: the pipeline calls itself (`a -> b -> a`), instead of a
                RecursionError.
        """
        recorder = current_recorder()
        assert recorder is not None
        with recorder.composing(self.name, self.func):
            return self.func(*args, **params)

    # -- running ---------------------------------------------------------------------------

    async def run(self, *args: Any, **params: Any) -> PipelineRun:
        """Run on the caller's event loop and return the finished `PipelineRun`.

        Raises:
            RunFailedError: a step failed.
            PipelineDefinitionError, ConfigError, RunNameConflictError: before any step runs.
        """
        from flowcore._engine._launch import run_pipeline

        return await run_pipeline(self, args, params)

    def submit(self, *args: Any, **params: Any) -> RunHandle:
        """Start a background run on the running loop and return its `RunHandle` at once."""
        from flowcore._engine._launch import submit_pipeline

        return submit_pipeline(self, args, params)

    def __call__(self, *args: Any, **params: Any) -> Any:
        """Inside another pipeline: inline this one (composition). Elsewhere: run it.

        A plain call blocks until the run ends and returns the `PipelineRun`, unless
        `synchronous=False` is configured, which returns a `RunHandle` at once.
        """
        if current_recorder() is not None:
            return self._inline(args, params)
        from flowcore._engine._launch import call_pipeline

        return call_pipeline(self, args, params)


@overload
def pipeline(func: Callable[..., Any], /) -> Pipeline: ...


@overload
def pipeline(func: None = None, /, **options: Any) -> Callable[[Callable[..., Any]], Pipeline]: ...


def pipeline(func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Turn a function into a pipeline; use bare (`@pipeline`) or with options."""
    if func is not None:
        return Pipeline(func, options)

    def decorate(f: Callable[..., Any]) -> Pipeline:
        return Pipeline(f, options)

    return decorate
