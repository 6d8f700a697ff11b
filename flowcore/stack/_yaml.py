"""Loading a stack from a YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from flowcore.config import config_errors
from flowcore.exceptions import ConfigError

if TYPE_CHECKING:
    from flowcore.stack import Stack

__all__ = ["stack_from_yaml"]


class _PathBlock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str


class _Component(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class _StackFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    metadata_store: _PathBlock | Literal["memory"] | None = None
    artifact_store: _PathBlock | Literal["memory"] | None = None
    alerter: _Component | None = None
    step_operators: dict[str, _Component] = Field(default_factory=dict)
    experiment_trackers: dict[str, _Component] = Field(default_factory=dict)
    pools: dict[str, int] = Field(default_factory=dict)


def _resolve(base: Path, raw: str) -> Path:
    p = Path(raw).expanduser()
    return p if p.is_absolute() else (base / p)


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
    from flowcore.stores._local import LocalArtifactStore
    from flowcore.stores._memory import InMemoryArtifactStore, InMemoryMetadataStore
    from flowcore.stores._sqlite import SqliteMetadataStore

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
    artifact_store: Any
    if spec.artifact_store is None or spec.artifact_store == "memory":
        if spec.artifact_store is None and isinstance(spec.metadata_store, _PathBlock):
            db_root = _resolve(base, spec.metadata_store.path)
            root = db_root.parent if db_root.suffix == ".db" else db_root
            artifact_store = LocalArtifactStore(root / "artifacts")
        else:
            artifact_store = InMemoryArtifactStore()
    else:
        artifact_store = LocalArtifactStore(_resolve(base, spec.artifact_store.path))
    kwargs: dict[str, Any] = {}
    root_dir: Path | None = None
    if spec.metadata_store is None or spec.metadata_store == "memory":
        kwargs["metadata_store"] = InMemoryMetadataStore()
    else:
        db = _resolve(base, spec.metadata_store.path)
        if db.suffix != ".db":
            db = db / "flowcore.db"
        root_dir = db.parent
        kwargs["metadata_factory"] = lambda a: SqliteMetadataStore(db, a)
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
        **kwargs,
    )
    if spec.pools:
        try:
            stack = stack.with_pools(**spec.pools)
        except ConfigError as exc:
            raise ConfigError(f"{where}: pools: {exc}") from None
    return stack
