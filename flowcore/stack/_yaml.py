"""Loading a stack from a YAML file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowcore.config import config_errors
from flowcore.exceptions import ConfigError

if TYPE_CHECKING:
    from flowcore.stack import Stack

__all__ = ["stack_from_yaml"]


class _MetadataBlock(BaseModel):
    """`{path: ...}` or `{url: ...}` (exactly one)."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _one_place(self) -> _MetadataBlock:
        if (self.path is None) == (self.url is None):
            raise ValueError("give exactly one of 'path' and 'url'")
        return self


class _ArtifactBlock(_MetadataBlock):
    storage_options: dict[str, Any] | None = None


class _Component(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class _StackFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    metadata_store: _MetadataBlock | Literal["memory"] | None = None
    artifact_store: _ArtifactBlock | Literal["memory"] | None = None
    alerter: _Component | None = None
    step_operators: dict[str, _Component] = Field(default_factory=dict)
    experiment_trackers: dict[str, _Component] = Field(default_factory=dict)
    pools: dict[str, int] = Field(default_factory=dict)


def _place(block: _MetadataBlock, base: Path) -> str:
    """The block's URL, or its path made absolute (a path is a path even when it reads like
    a URL word such as "memory")."""
    if block.url is not None:
        return block.url
    return str(base / Path(str(block.path)).expanduser())


@contextmanager
def _naming(where: str, key: str) -> Iterator[None]:
    """A store that cannot be built is a ConfigError naming the file and the key."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from None


def _build(kind: str, name: str, spec: _Component, where: str) -> Any:
    from flowcore.stack._alerters import WebhookAlerter
    from flowcore.stack._operators import DaskStepOperator, ProcessStepOperator
    from flowcore.stack._trackers import MLflowExperimentTracker

    factories: dict[str, dict[str, Any]] = {
        "alerter": {"webhook": WebhookAlerter},
        "step_operators": {"process": ProcessStepOperator, "dask": DaskStepOperator},
        "experiment_trackers": {"mlflow": MLflowExperimentTracker},
    }
    known = factories[kind]
    factory = known.get(spec.type)
    if factory is None:
        raise ConfigError(
            f"{where}: {kind} '{name}' has unknown type '{spec.type}' "
            f"(known: {', '.join(sorted(known))})"
        )
    options = dict(spec.model_extra or {})
    try:
        return factory(**options)
    except (TypeError, ConfigError) as exc:
        raise ConfigError(f"{where}: {kind} '{name}': {exc}") from None


def stack_from_yaml(path: Path) -> Stack:
    """Build a Stack from a YAML file; relative paths are relative to the file.

    Raises:
        ConfigError: the file is missing, not YAML, or has unknown keys or bad values; the
            message names the file and the key.
    """
    from flowcore.stack import Stack
    from flowcore.stack._urls import artifacts_from_url, metadata_from_url

    where = f"stack file '{path}'"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping")
    with config_errors(where):
        spec = _StackFile.model_validate(data)
    base = path.parent.absolute()
    metadata = spec.metadata_store
    if metadata is None or metadata == "memory":
        metadata_url = "memory"
    else:
        metadata_url = _place(metadata, base)
    with _naming(where, "metadata_store"):
        choice = metadata_from_url(metadata_url, base=base)
    artifacts = spec.artifact_store
    artifact_store: Any
    with _naming(where, "artifact_store"):
        if artifacts == "memory":
            artifact_store = artifacts_from_url("memory", base=base)
        elif artifacts is not None:
            artifact_store = artifacts_from_url(
                _place(artifacts, base),
                base=base, storage_options=artifacts.storage_options,
            )
        elif choice.db_path is not None:
            artifact_store = artifacts_from_url(str(choice.db_path.parent / "artifacts"), base=base)
        elif choice.shared is not None:
            artifact_store = artifacts_from_url("memory", base=base)
        else:
            raise ConfigError("a shared metadata store needs an artifact_store with a url")
    kwargs: dict[str, Any] = {"metadata_store": choice.shared, "metadata_factory": choice.factory}
    root_dir = choice.db_path.parent if choice.db_path is not None else None
    alerter = _build("alerter", "alerter", spec.alerter, where) if spec.alerter else None
    stack = Stack(
        artifact_store=artifact_store,
        alerter=alerter,
        step_operators={n: _build("step_operators", n, c, where)
                        for n, c in spec.step_operators.items()},
        experiment_trackers={n: _build("experiment_trackers", n, c, where)
                             for n, c in spec.experiment_trackers.items()},
        name=spec.name or path.stem,
        root=root_dir,
        location=choice.url,
        **kwargs,
    )
    if spec.pools:
        try:
            stack = stack.with_pools(**spec.pools)
        except ConfigError as exc:
            raise ConfigError(f"{where}: pools: {exc}") from None
    return stack
