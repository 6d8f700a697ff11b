"""Shared fixtures: every test gets its own FLOWCORE_HOME; `stack` runs a test on every store:
in memory, SQLite + local files, and PostgreSQL + S3 (real servers started for the session by
`_postgres_server` and `_s3_server`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _postgres_server import postgres_server, postgres_url
from _s3_server import S3, s3_bucket, s3_endpoint

import flowcore
from flowcore import Stack

# Fixtures every test module may use.
__all__ = ["postgres_server", "postgres_url", "s3_bucket", "s3_endpoint"]


@dataclass(frozen=True)
class SharedStores:
    """URLs of a fresh Postgres database and S3 prefix: the stores of many machines."""

    metadata: str
    artifacts: str
    storage_options: dict[str, Any]


@pytest.fixture
def shared_stores(postgres_url: str, s3_bucket: S3) -> SharedStores:
    """A new Postgres database and a new S3 bucket, as URLs (Stack.from_urls takes them)."""
    return SharedStores(postgres_url, s3_bucket.url(), s3_bucket.options)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point FLOWCORE_HOME at a fresh directory and reset the active stack around each test."""
    monkeypatch.setenv("FLOWCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLOWCORE_STACK", raising=False)
    monkeypatch.delenv("FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK", raising=False)
    monkeypatch.delenv("FLOWCORE_ENFORCE_TYPE_ANNOTATIONS", raising=False)
    flowcore.set_active_stack(None)
    yield
    flowcore.set_active_stack(None)


STORES = ["memory", "sqlite", "postgres+s3"]


def make_stack(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Stack:
    """A fresh stack of one kind: `memory`, `sqlite` (a SQLite file and local artifacts under
    tmp_path) or `postgres+s3` (a new database on the session's PostgreSQL server and a new
    bucket on its S3 server)."""
    if kind == "memory":
        return Stack.in_memory()
    if kind == "sqlite":
        return Stack.local(tmp_path / "stack")
    assert kind == "postgres+s3", kind
    shared = request.getfixturevalue("shared_stores")
    return Stack.from_urls(metadata=shared.metadata, artifacts=shared.artifacts,
                           storage_options=shared.storage_options)


@pytest.fixture(params=STORES)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The same behaviour suite against every store (the stack made active)."""
    s = make_stack(request.param, request, tmp_path)
    flowcore.set_active_stack(s)
    yield s
    flowcore.set_active_stack(None)


@pytest.fixture
def memory_stack() -> Iterator[Stack]:
    """An in-memory stack made active."""
    s = Stack.in_memory()
    flowcore.set_active_stack(s)
    yield s
    flowcore.set_active_stack(None)
