"""The in-memory artifact store: values kept in the process (mutable ones as its own copies),
hashed without I/O."""

from __future__ import annotations

import hashlib
import sys
from typing import Any

from flowcore._canonical import CacheKeyError, canonical, canonical_digest
from flowcore._models import ArtifactVersion
from flowcore._threads import run_in_worker_thread
from flowcore.exceptions import MaterializerError
from flowcore.materializers._copying import snapshot as _snapshot
from flowcore.materializers._estimate import SCALARS, is_immutable, roughly_small
from flowcore.materializers._json import dumps_pieces
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


def _hash_large(value: Any, materializer: str) -> str | None:
    """What `_hash_in_memory` gives, computed so the GIL is handed back between pieces (a
    worker thread doing one big `json.dumps` would stall the event loop all the same);
    None if it cannot be computed here (the lazy hasher then decides, and says why)."""
    try:
        form = canonical(value)
    except CacheKeyError:
        from flowcore.materializers import content_hash_of, materializer_for, type_from_name

        try:
            found = type_from_name(materializer) or materializer_for(type(value))
            return content_hash_of(value, found, type(value))
        except Exception:
            return None
    except Exception:  # a structure too deep to walk: the lazy hasher reports it
        return None
    digest = hashlib.sha256()
    # Byte for byte the text canonical_digest hashes.
    for piece in dumps_pieces(form, sort_keys=True, separators=(",", ":")):
        digest.update(piece.encode())
    return digest.hexdigest()


def _snapshot_and_hash(value: Any, materializer: str) -> tuple[Any, str | None]:
    """For a large value, in a worker thread: its snapshot and its content hash together."""
    kept = value if is_immutable(value) else _snapshot(value)
    return kept, _hash_large(kept, materializer)


def _copy_out(artifact: ArtifactVersion) -> Any:
    """What `load()` returns for a mutable stored value: a copy, so the stored one stays."""
    return _snapshot(artifact._value)


class InMemoryArtifactStore(ArtifactStore):
    """Keeps output values in the process: immutable ones by reference, mutable ones as the
    store's own deep copy (taken at save, off the loop when large), handed out as copies.

    A content hash is computed only when a cache key needs it, except for a large value,
    whose hash is computed at save in the worker thread that copies it.
    """

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
            # Kept in memory, but refused like on a durable stack when nothing could store
            # it (a threading.Lock): the same pipeline must not pass here and fail there.
            await run_in_worker_thread(_check_picklable, value, step_label)
        materializer_name = _name(materializer)
        digest: str | None = None
        kind = type(value)
        if kind in SCALARS and kind is not str and kind is not bytes:
            kept, immutable = value, True  # small and unchangeable by nature: the hot path
        elif roughly_small(value):
            immutable = is_immutable(value)
            kept = value if immutable else _snapshot(value)
        else:
            immutable = is_immutable(value)
            kept, digest = await run_in_worker_thread(_snapshot_and_hash, value,
                                                      materializer_name)
        art_id = f"{producer_step_run_id}.{name}"
        return ArtifactVersion(
            id=art_id,
            name=name,
            uri=f"memory://{art_id}",
            materializer=materializer_name,
            data_type=_name(data_type),
            producer_step_run_id=producer_step_run_id,
            python_version=_PYTHON_VERSION,
            content_hash=digest,
            hasher=_hash_in_memory,
            # Immutable values are shared freely; a mutable one is copied on every load.
            loader=None if immutable else _copy_out,
            value=kept,
        )

    def exists(self, artifact: ArtifactVersion) -> bool:
        return artifact.uri.startswith("memory://")

    async def verify(self, artifact: ArtifactVersion) -> str | None:
        # The value lives in this process and nothing can change it: always sound.
        if self.exists(artifact):
            return None
        return await super().verify(artifact)

    def bind(self, artifact: ArtifactVersion) -> ArtifactVersion:
        return artifact
