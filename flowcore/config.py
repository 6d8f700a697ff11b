"""Configuration models: retries, execution modes, and the YAML run-configuration schema."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flowcore.exceptions import ConfigError

__all__ = ["ExecutionMode", "RunConfigFile", "StepConfigFile", "StepRetryConfig", "load_run_config"]


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


class StepConfigFile(BaseModel):
    """The per-step block of a YAML run configuration (`steps: {<invocation ID>: ...}`)."""

    model_config = ConfigDict(extra="forbid")

    enable_cache: bool | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    retry: StepRetryConfig | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    step_operator: str | None = None
    experiment_tracker: str | None = None
    timeout: float | None = None


class RunConfigFile(BaseModel):
    """The YAML run configuration passed with `with_options(config_path=...)`."""

    model_config = ConfigDict(extra="forbid")

    run_name: str | None = None
    enable_cache: bool | None = None
    enable_artifact_metadata: bool | None = None
    execution_mode: ExecutionMode | None = None
    synchronous: bool | None = None
    max_concurrency: int | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    steps: dict[str, StepConfigFile] = Field(default_factory=dict)
    substitutions: dict[str, str] = Field(default_factory=dict)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, each naming the key path at fault."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
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
    try:
        return RunConfigFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"run configuration '{p}': {format_validation_error(exc)}") from exc
