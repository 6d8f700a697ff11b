"""Small artifacts kept inline: the stored bytes in the metadata row, no file.

On the default stack (SQLite + local artifacts), writing a file per small output (a staging
directory, a write, a rename, a stat, in a worker thread) cost about 1 ms per step: most of
a durable step's price. A value whose materializer can tell its exact files without I/O
(`Materializer.files_for`), that makes a single file of at most `INLINE_LIMIT` bytes, is
stored instead as that file's bytes in the `artifacts.content` column, written in the same
transaction as its step run's row. Its content hash is the one the file store would have
computed (`files_digest` of the same files), so cache keys and `content_hash` are the same
either way, and every load checks the bytes against it.

The artifact's uri is `inline:<content hash>/<file name>`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from flowcore._ids import new_id
from flowcore._models import ArtifactVersion
from flowcore.exceptions import ArtifactLoadError
from flowcore.materializers import Materializer, files_digest, remember_type, type_from_name
from flowcore.materializers._estimate import roughly_small

__all__ = ["INLINE_LIMIT", "inline_artifact", "inline_damage", "is_inline", "payload_of",
           "with_payload"]

INLINE_LIMIT = 4096  # bytes of the one encoded file; larger values go to the artifact store
_PREFIX = "inline:"
_PYTHON = "{}.{}.{}".format(*sys.version_info[:3])


def is_inline(artifact: ArtifactVersion) -> bool:
    return artifact.uri.startswith(_PREFIX)


def payload_of(artifact: ArtifactVersion) -> bytes | None:
    """The stored bytes of an inline artifact (None for any other artifact)."""
    if not is_inline(artifact):
        return None
    payload = artifact._value  # an inline artifact keeps its bytes here (see with_payload)
    return payload if isinstance(payload, bytes) else None


def with_payload(artifact: ArtifactVersion, payload: bytes | None) -> ArtifactVersion:
    """Bind an inline artifact read back from its row to its bytes and loader."""
    artifact._value = payload
    artifact._loader = _load
    return artifact


def inline_artifact(value: Any, *, materializer: type[Any], data_type: type[Any], name: str,
                    producer_step_run_id: str) -> ArtifactVersion | None:
    """An inline artifact for `value`, or None when it must go to the artifact store."""
    files_for = getattr(materializer, "files_for", None)
    if files_for is None or not roughly_small(value, INLINE_LIMIT):
        return None
    try:
        files = files_for(value)
    except Exception:  # the full save path (and its fallback rules) decides
        return None
    if not files or len(files) != 1:
        return None
    ((rel, data),) = files.items()
    if len(data) > INLINE_LIMIT or "/" in rel:
        return None
    digest, size = files_digest(files)
    stored_type = type(value) if isinstance(data_type, type) and isinstance(
        value, data_type) else data_type
    return with_payload(ArtifactVersion(
        id=new_id(), name=name, uri=f"{_PREFIX}{digest}/{rel}",
        materializer=remember_type(materializer), data_type=remember_type(stored_type),
        content_hash=digest, size=size, producer_step_run_id=producer_step_run_id,
        python_version=_PYTHON,
    ), data)


def _file_name(artifact: ArtifactVersion) -> str:
    return artifact.uri.rpartition("/")[2]


def _what(artifact: ArtifactVersion) -> str:
    return (f"artifact '{artifact.name}' (id {artifact.id}) of step run "
            f"{artifact.producer_step_run_id}, stored inline")


def inline_damage(artifact: ArtifactVersion) -> str | None:
    """Why an inline artifact cannot be reused (missing or changed bytes, a materializer or
    type that can no longer be imported), or None if it is sound."""
    payload = payload_of(artifact)
    if payload is None:
        return f"{_what(artifact)} is missing: its row holds no content"
    digest, size = files_digest({_file_name(artifact): payload})
    if digest != artifact._content_hash or (artifact.size is not None and size != artifact.size):
        return f"{_what(artifact)} is damaged: its content no longer matches its stored hash"
    materializer = type_from_name(artifact.materializer)
    if not (isinstance(materializer, type) and issubclass(materializer, Materializer)):
        return (f"{_what(artifact)} is no longer loadable: its materializer "
                f"'{artifact.materializer}' cannot be imported")
    try:
        found = type_from_name(artifact.data_type)
    except Exception as exc:
        return (f"{_what(artifact)} is no longer loadable: importing its type "
                f"'{artifact.data_type}' failed: {type(exc).__name__}: {exc}")
    if found is None:
        return (f"{_what(artifact)} is no longer loadable: its type '{artifact.data_type}' "
                "cannot be imported")
    return None


def _load(artifact: ArtifactVersion) -> Any:
    damage = inline_damage(artifact)
    if damage is not None:
        raise ArtifactLoadError(damage)
    payload = payload_of(artifact)
    assert payload is not None
    materializer = type_from_name(artifact.materializer)
    assert isinstance(materializer, type) and issubclass(materializer, Materializer)
    data_type = type_from_name(artifact.data_type) or object
    rel = _file_name(artifact)
    try:
        from_files = getattr(materializer, "from_files", None)
        if from_files is not None:
            return from_files({rel: payload}, data_type)
        # Any other materializer reads a directory: give it one holding its file.
        staging = tempfile.mkdtemp(prefix="flowcore-inline-")
        try:
            with open(os.path.join(staging, rel), "wb") as f:
                f.write(payload)
            return materializer().load(data_type, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except ArtifactLoadError:
        raise
    except Exception as exc:
        raise ArtifactLoadError(
            f"cannot load {_what(artifact)} with {artifact.materializer}: "
            f"{type(exc).__name__}: {exc}") from exc
