"""Shared fixtures: every test gets its own FLOWCORE_HOME; `stack` runs a test on both stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import flowcore
from flowcore import Stack


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


@pytest.fixture(params=["memory", "sqlite"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The same behaviour suite against the in-memory and the SQLite stack (made active)."""
    s = Stack.in_memory() if request.param == "memory" else Stack.local(tmp_path / "stack")
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
