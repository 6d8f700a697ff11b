"""Stores named by URL (API.md §18): `sqlite:///path`, a plain path, `postgresql://...`,
`s3://bucket/prefix` (or any fsspec URL), `memory`.

Only the chosen store's module is imported, so a stack on SQLite never imports asyncpg or
fsspec, and a missing extra is a ConfigError naming it when that store is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowcore.exceptions import ConfigError
from flowcore.stores._base import ArtifactStore, MetadataStore

__all__ = ["MetadataChoice", "artifacts_from_url", "metadata_from_url"]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_MEMORY = ("memory", "memory://", "sqlite:///:memory:")


@dataclass(frozen=True)
class MetadataChoice:
    """What a metadata URL names: a store shared by every loop (memory), or a factory that
    makes one per event loop (a store owning connections), and where a local one lives."""

    shared: MetadataStore | None = None
    factory: Callable[[ArtifactStore], MetadataStore] | None = None
    db_path: Path | None = None
    url: str | None = None


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _redacted(url: str) -> str:
    """The URL with any password replaced, for messages and reprs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    creds, _, host = rest.partition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def _sqlite_path(url: str, base: Path) -> Path:
    """`sqlite:///relative.db` and `sqlite:////absolute.db`, as SQLAlchemy spells them."""
    rest = url[len("sqlite://"):]
    if not rest.startswith("/") or rest == "/":
        raise ConfigError(
            f"metadata URL '{url}' names no file: write sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db"
        )
    return _resolve(base, rest[1:])


def _resolve(base: Path, raw: str) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else base / path


def _db_file(path: Path) -> Path:
    """A `.db` file as given, else `flowcore.db` inside the directory given."""
    return path if path.suffix == ".db" else path / "flowcore.db"


def _store_options(url: str) -> tuple[str, dict[str, float]]:
    """The URL without flowcore's own query parameters, and those parameters.

    `heartbeat_timeout=<seconds>`: how long a RUNNING run may go without a heartbeat before
    another process judges its owner dead (the only sign across hosts). Other parameters stay
    in the URL for the driver.
    """
    head, sep, query = url.partition("?")
    if not sep:
        return url, {}
    kept, options = [], {}
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key != "heartbeat_timeout":
            kept.append(part)
            continue
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise ConfigError(
                f"metadata store URL '{_redacted(head)}': heartbeat_timeout={value!r} must be a "
                "number of seconds > 0"
            )
        options[key] = seconds
    return head + ("?" + "&".join(kept) if kept else ""), options


def metadata_from_url(url: str, *, base: Path) -> MetadataChoice:
    """The metadata store `url` names; relative paths are relative to `base`.

    Raises:
        ConfigError: an empty URL, a scheme flowcore has no metadata store for, or a bad
            `heartbeat_timeout` parameter.
    """
    from flowcore.stores._memory import InMemoryMetadataStore

    text, options = _store_options(str(url).strip())
    if not text:
        raise ConfigError("the metadata store URL is empty")
    if text.lower() in _MEMORY:
        return MetadataChoice(shared=InMemoryMetadataStore())
    scheme = _scheme(text)
    if text.lower().startswith(_POSTGRES_SCHEMES):
        from flowcore.stores._postgres import PostgresMetadataStore

        return MetadataChoice(
            factory=lambda artifacts: PostgresMetadataStore(text, artifacts, **options),
            url=_redacted(text))
    if scheme == "sqlite":
        db = _db_file(_sqlite_path(text, base))
    elif scheme in ("", "file"):
        db = _db_file(_resolve(base, text[len("file://"):] if scheme == "file" else text))
    else:
        raise ConfigError(
            f"metadata store URL '{_redacted(text)}' has scheme '{scheme}': flowcore keeps "
            "metadata in sqlite:///path (or a plain path), postgresql://... or memory"
        )
    from flowcore.stores._sqlite import SqliteMetadataStore

    return MetadataChoice(factory=lambda artifacts: SqliteMetadataStore(db, artifacts, **options),
                          db_path=db)


def artifacts_from_url(url: str, *, base: Path,
                       storage_options: Mapping[str, Any] | None = None) -> ArtifactStore:
    """The artifact store `url` names: a local directory (plain path or `file://`), `memory`,
    or any fsspec URL (`s3://bucket/prefix`, `gs://...`, `az://...`).

    Raises:
        ConfigError: an empty URL, storage options for a local directory, or (from the store)
            an fsspec protocol whose package is not installed.
    """
    text = str(url).strip()
    if not text:
        raise ConfigError("the artifact store URL is empty")
    scheme = _scheme(text)
    if text.lower() in _MEMORY:
        from flowcore.stores._memory import InMemoryArtifactStore

        return InMemoryArtifactStore()
    if scheme in ("", "file"):
        if storage_options:
            raise ConfigError(
                f"artifact store '{text}' is a local directory: storage_options apply only to "
                "object stores such as s3://"
            )
        from flowcore.stores._local import LocalArtifactStore

        return LocalArtifactStore(_resolve(base, text[len("file://"):] if scheme == "file" else text))
    from flowcore.stores._fsspec import FsspecArtifactStore

    return FsspecArtifactStore(text, storage_options)
