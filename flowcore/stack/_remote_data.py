"""Steps that move their own data (API.md §18): with an artifact store every machine can reach,
a step on a Dask worker loads its inputs from the store and stores its outputs itself; the
driver passes references and gets references back, so its memory does not grow with the data.

The engine asks `moves_own_data(operator, store)`; when true it hands the operator
`worker_body(...)` in place of the step's function, with every stored input as a
`StoredValue` reference, and gets a `StoredOutputs` back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from flowcore._models import ArtifactVersion
from flowcore.exceptions import MaterializerError

__all__ = [
    "RemoteArtifactStore", "StoredOutputs", "StoredValue", "load_references", "moves_own_data",
    "worker_body",
]


@runtime_checkable
class RemoteArtifactStore(Protocol):
    """An artifact store a worker process can use by itself (synchronously)."""

    def save_sync(self, value: Any, *, materializer: type[Any], data_type: type[Any], name: str,
                  producer_step_run_id: str, step_label: str) -> ArtifactVersion: ...

    def load_sync(self, artifact: ArtifactVersion) -> Any: ...


@dataclass(frozen=True, slots=True)
class StoredValue:
    """A value that lives only in the artifact store: what the driver holds in its place."""

    artifact: ArtifactVersion


@dataclass(frozen=True, slots=True)
class StoredOutputs:
    """What a worker returns: each output's stored artifact, by output name."""

    artifacts: dict[str, ArtifactVersion]


def moves_own_data(operator: Any, store: Any) -> bool:
    """Whether steps on `operator` load and store their data themselves through `store`: a
    remote operator (one whose workers are other processes or machines) with a store that
    every one of them can reach."""
    return bool(getattr(operator, "moves_data", False)) and isinstance(store, RemoteArtifactStore) \
        and bool(getattr(store, "shared_by_hosts", False))


def load_references(value: Any, load: Callable[[ArtifactVersion], Any]) -> Any:
    """`value` with every StoredValue in it (also inside lists, tuples and dicts, as a fan-in
    passes them) replaced by its loaded value."""
    kind = type(value)
    if kind is StoredValue:
        return load(value.artifact)
    if kind is list:
        return [load_references(v, load) for v in value]
    if kind is tuple:
        return tuple([load_references(v, load) for v in value])
    if kind is dict:
        return {k: load_references(v, load) for k, v in value.items()}
    return value


def worker_body(func: Callable[..., Any], is_async: bool, store: RemoteArtifactStore, *,
                split: Callable[[Any], dict[str, Any]],
                materializers: Mapping[str, type[Any]],
                check_inputs: Callable[[dict[str, Any]], None],
                producer_step_run_id: str, label: str) -> Callable[..., Any]:
    """The function a worker runs in place of `func`: inputs loaded, outputs split, checked
    and stored there; returns a `StoredOutputs`. Async when `func` is, so the operator's
    cancellation of an async body still applies."""

    def load(kwargs: dict[str, Any]) -> dict[str, Any]:
        loaded = {key: load_references(value, store.load_sync) for key, value in kwargs.items()}
        check_inputs(loaded)
        return loaded

    def save(result: Any) -> StoredOutputs:
        from flowcore.materializers import materializer_for

        stored = {}
        for name, value in split(result).items():
            materializer = (materializers.get(name) or materializers.get("*")
                            or materializer_for(type(value)))
            try:
                stored[name] = store.save_sync(
                    value, materializer=materializer, data_type=type(value), name=name,
                    producer_step_run_id=producer_step_run_id,
                    step_label=f"{label}, output '{name}'",
                )
            except MaterializerError:
                raise
            except Exception as exc:
                raise MaterializerError(
                    f"{label}, output '{name}': cannot store {type(value).__name__} with "
                    f"{materializer.__name__}: {exc}"
                ) from exc
        return StoredOutputs(stored)

    if is_async:
        async def remote_async(**kwargs: Any) -> StoredOutputs:
            return save(await func(**load(kwargs)))

        return remote_async

    def remote_sync(**kwargs: Any) -> StoredOutputs:
        return save(func(**load(kwargs)))

    return remote_sync
