"""Configuration: retries, execution modes, option and YAML schemas, environment variables.

Options are validated where they enter (the decorators, `configure`, `with_options`, a YAML
run configuration, an environment variable), so a bad value is a `ConfigError` naming the
step or pipeline and the key before any run starts. Every pydantic `ValidationError` becomes
a `ConfigError` in one place: `config_errors`.
"""

from __future__ import annotations

import enum
import os
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)

from flowcore.exceptions import ConfigError

__all__ = [
    "CachePolicy",
    "ExecutionMode",
    "RunConfigFile",
    "StepConfigFile",
    "StepRetryConfig",
    "as_cache_policy",
    "config_errors",
    "env_flag",
    "load_run_config",
    "validate_pipeline_options",
    "validate_step_options",
]


class ExecutionMode(enum.StrEnum):
    """What a run does when a step fails."""

    FAIL_FAST = "fail_fast"
    STOP_ON_FAILURE = "stop_on_failure"
    CONTINUE_ON_FAILURE = "continue_on_failure"

    def __str__(self) -> str:
        return self.value


class StepRetryConfig(BaseModel):
    """How often and how patiently a failing step is retried.

    Retry k (1-based) waits `delay * backoff**(k-1)` seconds, capped by `max_delay`; `jitter`
    adds up to that fraction of the delay at random.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    max_retries: int = Field(default=1, ge=0)
    delay: float = Field(default=0.0, ge=0)
    backoff: float = Field(default=1.0, ge=0)
    max_delay: float | None = Field(default=None, ge=0)
    jitter: float = Field(default=0.0, ge=0)
    retry_on: tuple[type[BaseException], ...] | type[BaseException] = (Exception,)

    @field_validator("retry_on", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, type):
            return (value,)
        return value


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """What else decides whether a step's cache entry may be reused.

    `expires_after` (seconds or a `timedelta`) makes entries older than that misses;
    `depends_on` adds functions, modules or file/directory paths whose code or content enters
    the key (a relative path is read from the working directory when the step runs; a path
    that does not exist then makes that run uncached, with the reason); `ignore` names inputs
    or parameters left out of the key.

    Raises:
        ConfigError: a value of the wrong kind, naming the field.
    """

    expires_after: float | timedelta | None = None
    depends_on: tuple[object, ...] = ()
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Normalized here, so every CachePolicy in the process is in one form.
        set_ = object.__setattr__
        set_(self, "expires_after", _expiry_seconds(self.expires_after))
        set_(self, "depends_on", _dependencies(self.depends_on))
        set_(self, "ignore", _ignored_names(self.ignore))

    @property
    def expires_after_seconds(self) -> float | None:
        """`expires_after` in seconds (None: entries never expire)."""
        value = self.expires_after
        return value.total_seconds() if isinstance(value, timedelta) else value


def _expiry_seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(
            f"CachePolicy: expires_after = {value!r}: must be seconds (a number) or a timedelta"
        )
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"CachePolicy: expires_after = {value!r}: must be a positive duration")
    return seconds


def _dependencies(value: object) -> tuple[object, ...]:
    items = value if isinstance(value, list | tuple) else (value,)
    for item in items:
        if not (isinstance(item, str | os.PathLike | types.ModuleType) or callable(item)):
            raise ConfigError(
                f"CachePolicy: depends_on item {item!r} is not a function, module or file path"
            )
        if isinstance(item, str) and not item:
            raise ConfigError("CachePolicy: depends_on has an empty path")
    return tuple(items)


def _ignored_names(value: object) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, list | tuple | set | frozenset):
        raise ConfigError(f"CachePolicy: ignore = {value!r}: must be input or parameter names")
    names = []
    for name in items:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"CachePolicy: ignore item {name!r} is not an input or parameter name")
        names.append(name)
    return tuple(sorted(set(names)))


def as_cache_policy(value: object) -> CachePolicy | None:
    """A `cache_policy` option as a CachePolicy: None, a CachePolicy, or a mapping of its fields.

    Raises:
        ConfigError: not one of those, or a bad field value (the message names the field).
    """
    if value is None or isinstance(value, CachePolicy):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"expires_after", "depends_on", "ignore"}
        if unknown:
            raise ConfigError(f"CachePolicy has no field {sorted(unknown)[0]!r}")
        return CachePolicy(**value)
    raise ConfigError(f"must be a CachePolicy, not {type(value).__name__}")


def _valid_run_name(value: str | None) -> str | None:
    if value is not None:
        from flowcore._naming import run_name_problem

        problem = run_name_problem(value)
        if problem is not None:
            raise ValueError(problem)
    return value


# Option value types shared by the Python options and the YAML file.
Seconds = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
ComponentName = Annotated[str, Field(strict=True, min_length=1)]
Concurrency = Annotated[int, Field(strict=True, ge=1)]
RunNameTemplate = Annotated[str, Field(strict=True), AfterValidator(_valid_run_name)]


class StepConfigFile(BaseModel):
    """The per-step block of a YAML run configuration (`steps: {<invocation ID>: ...}`)."""

    model_config = ConfigDict(extra="forbid")

    enable_cache: bool | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    retry: StepRetryConfig | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    step_operator: ComponentName | None = None
    experiment_tracker: ComponentName | None = None
    timeout: Seconds | None = None
    pool: ComponentName | None = None


class RunConfigFile(BaseModel):
    """The YAML run configuration passed with `with_options(config_path=...)`."""

    model_config = ConfigDict(extra="forbid")

    run_name: RunNameTemplate | None = None
    enable_cache: bool | None = None
    enable_artifact_metadata: bool | None = None
    execution_mode: ExecutionMode | None = None
    synchronous: bool | None = None
    max_concurrency: Concurrency | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    steps: dict[str, StepConfigFile] = Field(default_factory=dict)
    substitutions: dict[str, str] = Field(default_factory=dict)
    timeout: Seconds | None = None  # the run's deadline (API.md §15)


class _CommonOptions(BaseModel):
    """Options of both `@step` and `@pipeline` whose values have a fixed type."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    name: ComponentName | None = None
    enable_cache: StrictBool | None = None
    enable_artifact_metadata: StrictBool | None = None
    retry: StepRetryConfig | None = None
    settings: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None
    cache_policy: Any = None
    # Bytes of a step's printed/logged output kept (the last ones); None keeps everything.
    log_limit: Annotated[int, Field(strict=True, ge=0)] | None = None

    @field_validator("cache_policy")
    @classmethod
    def _cache_policy(cls, value: Any) -> Any:
        try:
            return as_cache_policy(value)
        except ConfigError as exc:  # reported by config_errors with the option's name
            raise ValueError(str(exc)) from None


class _StepOptions(_CommonOptions):
    timeout: Seconds | None = None
    pool: ComponentName | None = None
    step_operator: ComponentName | None = None
    experiment_tracker: ComponentName | None = None
    output_materializers: dict[str, Any] | type | str | None = None


class _PipelineOptions(_CommonOptions):
    timeout: Seconds | None = None
    execution_mode: ExecutionMode | None = None
    max_concurrency: Concurrency | None = None
    run_name: RunNameTemplate | None = None
    config_path: str | os.PathLike[str] | None = None
    synchronous: StrictBool | None = None
    capture_logs: StrictBool | None = None
    substitutions: dict[str, Any] | None = None
    resume_from: Any = None  # a run name or id, or a PipelineRun (checked when the run starts)


def validate_step_options(options: Mapping[str, Any], step_name: str) -> None:
    """Check the values of `@step` / `configure` / `with_options` keywords.

    Raises:
        ConfigError: naming the step and the key, e.g. for `retry=3` or `timeout=-1`.
    """
    with config_errors(f"step '{step_name}'", options=True):
        _StepOptions.model_validate(options)


def validate_pipeline_options(options: Mapping[str, Any], pipeline_name: str) -> None:
    """Check the values of `@pipeline` / `configure` / `with_options` keywords.

    Raises:
        ConfigError: naming the pipeline and the key (a bad execution_mode, max_concurrency,
            run-name template, ...).
    """
    where = f"pipeline '{pipeline_name}'"
    with config_errors(where, options=True):
        _PipelineOptions.model_validate(options)
    stack = options.get("stack")
    # Checked by shape: the Stack class lives three layers up (the engine checks its type).
    if stack is not None and not (hasattr(stack, "metadata_store")
                                  and hasattr(stack, "artifact_store")):
        raise ConfigError(f"{where}: option 'stack' must be a Stack, not {stack!r}")


@contextmanager
def config_errors(where: str, *, options: bool = False) -> Iterator[None]:
    """Turn a pydantic `ValidationError` raised inside into a `ConfigError` naming `where` and
    the key at fault (`options`: the keys are keyword options, quoted with their value)."""
    try:
        yield
    except ValidationError as exc:
        detail = _format_options_error(exc) if options else format_validation_error(exc)
        raise ConfigError(f"{where}: {detail}") from None


def _format_options_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        shown = repr(e.get("input"))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        parts.append(f"option '{loc[0] if loc else '?'}' = {shown}: {_message(e)}")
    # pydantic reports every branch of `X | None`; the first line per key says enough.
    seen: dict[str, str] = {}
    for part in parts:
        seen.setdefault(part.split(" = ", 1)[0], part)
    return "; ".join(seen.values())


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def env_flag(name: str) -> bool:
    """Whether an environment variable is set to a true value (unset or empty is false).

    Raises:
        ConfigError: the value is none of true/false/1/0/yes/no/on/off (any case).
    """
    raw = os.environ.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(
        f"environment variable {name}={raw!r} is not a boolean; use true/false, 1/0, yes/no "
        "or on/off"
    )


def _message(error: Any) -> str:
    """pydantic's message, without the "Value error, " it puts before our own validators'."""
    ctx = error.get("ctx") or {}
    if error.get("type") == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return str(error["msg"])


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the key path at fault."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        parts.append(f"{loc}: {_message(e)}")
    return "; ".join(parts)


def load_run_config(path: str | Path) -> RunConfigFile:
    """Read and validate a YAML run configuration.

    Raises:
        ConfigError: the file is missing, is not YAML, or has unknown keys or bad values;
            the message names the file and the key.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read run configuration '{p}': {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"run configuration '{p}' is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"run configuration '{p}' must be a mapping, not {type(data).__name__}")
    with config_errors(f"run configuration '{p}'"):
        config = RunConfigFile.model_validate(data)
    return config
