"""Materializing a value into a directory (with the cloudpickle fallback) and hashing it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any

from flowcore.exceptions import MaterializerError
from flowcore.materializers._base import Materializer, is_builtin_materializer
from flowcore.materializers._cloudpickle import CloudpickleMaterializer

__all__ = [
    "RESERVED_PREFIX",
    "DirectoryState",
    "content_hash_of",
    "directory_digest",
    "directory_state",
    "files_digest",
    "hash_directory",
    "replace_content",
    "save_with_fallback",
    "state_size",
]

# Top-level files whose names start with this belong to the artifact store (signatures,
# metadata); they are not content, so they are left out of the content hash.
RESERVED_PREFIX = ".flowcore"

_CHUNK = 1 << 20
_logger = logging.getLogger("flowcore")


def _qualname(tp: Any) -> str:
    return f"{getattr(tp, '__module__', '?')}.{getattr(tp, '__qualname__', repr(tp))}"


def save_with_fallback(
    value: Any,
    materializer: type[Materializer],
    uri: str,
    *,
    label: str | None = None,
) -> type[Materializer]:
    """Run `materializer().save(value, uri)`; if a built-in one fails, use cloudpickle instead.

    Args:
        value: what to store.
        materializer: the materializer chosen for the value.
        uri: an existing, empty directory.
        label: names the step and output in the fallback warning and in errors; with no
            label (e.g. when only hashing) the fallback is silent.

    Returns:
        The materializer that stored the value.

    Raises:
        MaterializerError: a user's materializer failed, or even cloudpickle could not store
            the value (a `threading.Lock`, an open socket).
    """
    where = label or "artifact"
    try:
        _save_into(materializer, value, uri)
        return materializer
    except Exception as exc:
        if not is_builtin_materializer(materializer) or issubclass(
            materializer, CloudpickleMaterializer
        ):
            raise _save_error(where, value, materializer, exc) from exc
        first_error = exc
    # Start the fallback from an empty directory: the failed save may have left files.
    shutil.rmtree(uri)
    os.makedirs(uri)
    try:
        CloudpickleMaterializer().save(value, uri)
    except Exception as exc:
        raise _save_error(where, value, CloudpickleMaterializer, exc) from exc
    if label is not None:
        _logger.warning(
            "materializer_fallback: %s: %s cannot store a value of type %s (%s); pickled it "
            "with cloudpickle instead, which loads only under this Python major.minor",
            label, materializer.__qualname__, _qualname(type(value)), first_error,
        )
    return CloudpickleMaterializer


def _save_into(materializer: type[Materializer], value: Any, uri: str) -> None:
    """`materializer().save(value, uri)` with `uri` an existing empty directory; a materializer
    that creates the directory itself (`os.mkdir(uri)`) gets it absent instead."""
    try:
        materializer().save(value, uri)
    except FileExistsError as exc:
        if os.path.abspath(str(exc.filename or "")) != os.path.abspath(uri) or os.listdir(uri):
            raise
        os.rmdir(uri)
        materializer().save(value, uri)
        os.makedirs(uri, exist_ok=True)


def _save_error(
    where: str, value: Any, materializer: type[Materializer], exc: Exception
) -> MaterializerError:
    if materializer is CloudpickleMaterializer:
        return MaterializerError(
            f"{where}: no materializer can store a value of type {_qualname(type(value))}: "
            f"cloudpickle failed with {type(exc).__name__}: {exc}; return a picklable value "
            "or give the output a materializer (output_materializers=...)"
        )
    return MaterializerError(
        f"{where}: materializer {_qualname(materializer)} failed to store a value of type "
        f"{_qualname(type(value))}: {type(exc).__name__}: {exc}"
    )


def _entry(rel: str, size: int) -> bytes:
    encoded = rel.encode("utf-8", "surrogateescape")
    # Length prefixes keep the stream unambiguous: no name/content boundary can shift.
    return b"".join((len(encoded).to_bytes(8, "big"), encoded, size.to_bytes(8, "big")))


def _digest_entry(digest: Any, rel: str, size: int) -> None:
    digest.update(_entry(rel, size))


def files_digest(files: dict[str, bytes]) -> tuple[str, int]:
    """What `directory_digest` gives for a directory holding exactly these files."""
    if len(files) == 1:
        # The common case (a small value's one file): the same bytes hashed in one call.
        ((rel, data),) = files.items()
        if "/" in rel or not rel.startswith(RESERVED_PREFIX):
            size = len(data)
            one = hashlib.sha256(_entry(rel, size))
            one.update(data)
            return one.hexdigest(), size
    digest = hashlib.sha256()
    total = 0
    for rel in sorted(files):
        data = files[rel]
        total += len(data)
        if "/" not in rel and rel.startswith(RESERVED_PREFIX):
            continue
        _digest_entry(digest, rel, len(data))
        digest.update(data)
    return digest.hexdigest(), total


def directory_digest(path: str) -> tuple[str, int]:
    """Return (`hash_directory(path)`, total size in bytes of every file under `path`)."""
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is not a directory")
    files: list[tuple[str, str, int]] = []
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            size = os.path.getsize(full)
            total += size
            if dirpath == path and name.startswith(RESERVED_PREFIX):
                continue
            files.append((os.path.relpath(full, path).replace(os.sep, "/"), full, size))
    files.sort()
    digest = hashlib.sha256()
    for rel, full, size in files:
        _digest_entry(digest, rel, size)
        with open(full, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest(), total


def hash_directory(path: str) -> str:
    """The sha256 (hex) of a directory's files: relative paths and contents, in sorted order.

    Top-level files whose names start with ".flowcore" are skipped: the artifact store keeps
    its signature and metadata there.
    """
    return directory_digest(path)[0]


def content_hash_of(value: Any, materializer: type[Materializer], data_type: type) -> str:
    """The content hash `value` would have if stored with `materializer` (built-ins fall back).

    `data_type` is accepted for symmetry with the stores; saving does not need it.
    """
    with tempfile.TemporaryDirectory(prefix="flowcore-hash-") as tmp:
        uri = os.path.join(tmp, "artifact")
        os.makedirs(uri)
        save_with_fallback(value, materializer, uri)
        return hash_directory(uri)


# What a directory looks like to stat(): (relative path, size, mtime in ns, inode) of every
# file, sorted. Any write, replacement or deletion of a file changes it.
DirectoryState = tuple[tuple[str, int, int, int], ...]


def directory_state(path: str) -> DirectoryState | None:
    """The stat() view of every file under `path`, or None if `path` is no directory.

    Costs one stat per file and reads no content, so it may run on the event loop for an
    artifact of a few files.
    """
    entries: list[tuple[str, int, int, int]] = []
    pending = [("", path)]
    try:
        while pending:
            rel_dir, full_dir = pending.pop()
            with os.scandir(full_dir) as it:
                for entry in it:
                    rel = f"{rel_dir}{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((rel + "/", entry.path))
                    else:
                        st = entry.stat(follow_symlinks=False)
                        entries.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    except (FileNotFoundError, NotADirectoryError):
        return None
    entries.sort()
    return tuple(entries)


def state_size(state: DirectoryState) -> int:
    """The total size in bytes of the files a `directory_state` saw."""
    return sum(entry[1] for entry in state)


def replace_content(source: str, target: str) -> None:
    """Make the directory `target` hold exactly the files of `source`, moving them over.

    Each file is renamed into place (atomic per file), so a reader sees either the old or
    the new file whole; what `target` has and `source` has not (a stray or damaged entry)
    is removed. `source` is left empty.
    """
    wanted: set[str] = set()
    for dirpath, dirs, names in os.walk(source):
        rel_dir = os.path.relpath(dirpath, source)
        target_dir = os.path.normpath(os.path.join(target, rel_dir))
        if os.path.islink(target_dir) or (os.path.lexists(target_dir)
                                          and not os.path.isdir(target_dir)):
            os.unlink(target_dir)
        os.makedirs(target_dir, exist_ok=True)
        for name in dirs + names:
            wanted.add(os.path.normpath(os.path.join(rel_dir, name)))
        for name in names:
            dst = os.path.join(target_dir, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(dirpath, name), dst)
    for dirpath, dirs, names in os.walk(target, topdown=False):
        for name in names + dirs:
            full = os.path.join(dirpath, name)
            if os.path.normpath(os.path.relpath(full, target)) in wanted:
                continue
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
