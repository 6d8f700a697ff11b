"""The in-memory artifact store: values kept in the process, hashed without I/O."""

from __future__ import annotations

import sys
from typing import Any

from flowcore._canonical import CacheKeyError, canonical_digest
from flowcore._models import ArtifactVersion
from flowcore._threads import run_in_worker_thread
from flowcore.exceptions import MaterializerError
from flowcore.stores._base import ArtifactStore

__all__ = ["InMemoryArtifactStore"]

_PYTHON_VERSION = sys.version.split()[0]
_names: dict[type, str] = {}

def _name(cls: type) -> str:
    name = _names.get(cls)
    if name is None:
        name = _names[cls] = f"{cls.__module__}.{cls.__qualname__}"
    return name


def _check_picklable(value: Any, step_label: str) -> None:
    import cloudpickle

    try:
        cloudpickle.dumps(value)
    except Exception as exc:
        raise MaterializerError(
            f"{step_label}: no materializer can store a value of type "
            f"{type(value).__qualname__}: cloudpickle failed with {type(exc).__name__}: {exc}; "
            "return a picklable value or give the output a materializer (output_materializers=...)"
        ) from exc


def _hash_in_memory(artifact: ArtifactVersion) -> str:
    """The content hash of a value kept in memory: its canonical form when it has one (fast,
    no I/O), else what its materializer writes."""
    value = artifact._value
    try:
        return canonical_digest(value)
    except CacheKeyError:
        from flowcore.materializers import content_hash_of, materializer_for, type_from_name

        materializer = type_from_name(artifact.materializer) or materializer_for(type(value))
        return content_hash_of(value, materializer, type(value))


class InMemoryArtifactStore(ArtifactStore):
    """Keeps output values by reference; a content hash is computed only when a cache key needs it."""

    async def save(
        self,
        value: Any,
        *,
        materializer: type[Any],
        data_type: type[Any],
        name: str,
        producer_step_run_id: str,
        step_label: str,
    ) -> ArtifactVersion:
        if materializer.__name__ == "CloudpickleMaterializer":
            # Kept by reference, but refused like on a durable stack when nothing could store
            # it (a threading.Lock): the same pipeline must not pass here and fail there.
            await run_in_worker_thread(_check_picklable, value, step_label)
        art_id = f"{producer_step_run_id}.{name}"
        return ArtifactVersion(
            id=art_id,
            name=name,
            uri=f"memory://{art_id}",
            materializer=_name(materializer),
            data_type=_name(data_type),
            producer_step_run_id=producer_step_run_id,
            python_version=_PYTHON_VERSION,
            hasher=_hash_in_memory,
            value=value,
        )

    def exists(self, artifact: ArtifactVersion) -> bool:
        return artifact.uri.startswith("memory://")

    def bind(self, artifact: ArtifactVersion) -> ArtifactVersion:
        return artifact
