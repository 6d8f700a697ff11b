"""The stack: a metadata store, an artifact store and named components (alerter, step
operators, experiment trackers)."""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowcore.exceptions import ConfigError, SyncCallOnLoopError
from flowcore.stack._alerters import Alerter, WebhookAlerter
from flowcore.stack._live import LiveRuns
from flowcore.stack._operators import (
    DaskStepOperator,
    LocalStepOperator,
    ProcessStepOperator,
    StepOperator,
    StepOperatorError,
)
from flowcore.stack._pools import Pools
from flowcore.stack._trackers import ExperimentTracker, MLflowExperimentTracker
from flowcore.stores._base import ArtifactStore, MetadataStore
from flowcore.stores._memory import InMemoryArtifactStore, InMemoryMetadataStore

__all__ = [
    "Alerter",
    "DaskStepOperator",
    "ExperimentTracker",
    "LocalStepOperator",
    "MLflowExperimentTracker",
    "ProcessStepOperator",
    "Stack",
    "StepOperator",
    "StepOperatorError",
    "WebhookAlerter",
    "get_active_stack",
    "set_active_stack",
]

MetadataFactory = Callable[[ArtifactStore], MetadataStore]


@dataclass(eq=False)
class _LoopStore:
    """The metadata store a stack opened on one event loop, and what closes it with the loop."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    store: MetadataStore | None = None
    closer: AsyncGenerator[None, None] | None = None


def flowcore_home() -> Path:
    """`$FLOWCORE_HOME`, default `./.flowcore`, read now (not at import)."""
    return Path(os.environ.get("FLOWCORE_HOME") or ".flowcore").absolute()


class Stack:
    """Where runs are stored and where steps run.

    Build one with `Stack.local(path)`, `Stack.in_memory()` or `Stack.from_yaml(path)`; add
    components with `with_components(...)`.
    """

    def __init__(
        self,
        *,
        artifact_store: ArtifactStore,
        metadata_store: MetadataStore | None = None,
        metadata_factory: MetadataFactory | None = None,
        alerter: Alerter | None = None,
        step_operators: Mapping[str, StepOperator] | None = None,
        experiment_trackers: Mapping[str, ExperimentTracker] | None = None,
        name: str = "default",
        root: Path | None = None,
        location: str | None = None,
    ) -> None:
        if metadata_store is None and metadata_factory is None:
            raise ConfigError("a stack needs a metadata store")
        self.name = name
        self.root = root
        # Where the metadata lives, for messages: a directory, or a URL without its password.
        self.location = location or (str(root) if root else None)
        self.artifact_store = artifact_store
        # A store bound to no event loop (memory) is shared; a connection-owning store is made
        # per event loop, because its connection belongs to the loop that opened it.
        self._shared_store = metadata_store
        self._factory = metadata_factory
        self._artifacts_checked = False
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopStore] = (
            weakref.WeakKeyDictionary()
        )
        self.alerter = alerter
        self.step_operators: dict[str, StepOperator] = dict(step_operators or {})
        self.experiment_trackers: dict[str, ExperimentTracker] = dict(experiment_trackers or {})
        self.local_operator = LocalStepOperator()
        self.live_runs = LiveRuns()
        self.pools = Pools()

    def __repr__(self) -> str:
        return f"<Stack {self.name} {self.location or 'memory'}>"

    @classmethod
    def in_memory(cls) -> Stack:
        """A stack that keeps runs and artifacts in this process only."""
        return cls(
            metadata_store=InMemoryMetadataStore(),
            artifact_store=InMemoryArtifactStore(),
            name="in_memory",
        )

    @classmethod
    def local(cls, path: str | os.PathLike[str]) -> Stack:
        """A durable stack rooted at `path`: `flowcore.db` (SQLite) and `artifacts/`."""
        from flowcore.stores._local import LocalArtifactStore
        from flowcore.stores._sqlite import SqliteMetadataStore

        root = Path(path).absolute()
        artifacts = LocalArtifactStore(root / "artifacts")
        db = root / "flowcore.db"
        return cls(
            artifact_store=artifacts,
            metadata_factory=lambda a: SqliteMetadataStore(db, a),
            name="local",
            root=root,
        )

    @classmethod
    def default(cls) -> Stack:
        """The local stack under `$FLOWCORE_HOME` (one per home directory per process)."""
        home = flowcore_home()
        stack = _default_stacks.get(home)
        if stack is None:
            stack = _default_stacks[home] = cls.local(home)
        return stack

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Stack:
        """Load a stack from a YAML file (see API.md section 9)."""
        from flowcore.stack._yaml import stack_from_yaml

        return stack_from_yaml(Path(path))

    @classmethod
    def from_urls(
        cls,
        metadata: str,
        artifacts: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        *,
        name: str = "urls",
    ) -> Stack:
        """A stack whose stores are named by URL (API.md section 18).

        `metadata`: `sqlite:///relative.db`, `sqlite:////absolute.db`, a plain path (a `.db`
        file, or a directory holding `flowcore.db`), `postgresql://user@host/db` (extra
        `postgres`) or `memory`. `artifacts`: a plain path, `s3://bucket/prefix` or any other
        fsspec URL (extra `s3` for S3; `storage_options` go to fsspec, else credentials and the
        endpoint come from the standard environment), or `memory`; left out, a local metadata
        store keeps its artifacts in `artifacts/` beside its database and a memory one in
        memory. Nothing is contacted here: the stores are reached when the stack opens (or
        its first run starts), before any step runs.

        Raises:
            ConfigError: an unknown scheme, a missing extra, or no artifact store given for a
                Postgres metadata store.
        """
        from flowcore.stack._urls import artifacts_from_url, metadata_from_url

        base = Path.cwd()
        choice = metadata_from_url(metadata, base=base)
        if artifacts is not None:
            artifact_store = artifacts_from_url(artifacts, base=base, storage_options=storage_options)
        elif choice.db_path is not None:
            from flowcore.stores._local import LocalArtifactStore

            artifact_store = LocalArtifactStore(choice.db_path.parent / "artifacts")
        elif choice.shared is not None:
            artifact_store = InMemoryArtifactStore()
        else:
            raise ConfigError(
                f"Stack.from_urls(metadata='{choice.url}') needs artifacts=...: a shared metadata "
                "store needs an artifact store every process can reach, such as s3://bucket/prefix"
            )
        return cls(
            artifact_store=artifact_store,
            metadata_store=choice.shared,
            metadata_factory=choice.factory,
            name=name,
            root=choice.db_path.parent if choice.db_path is not None else None,
            location=choice.url,
        )

    def with_components(
        self,
        *,
        alerter: Alerter | None = None,
        step_operators: Mapping[str, StepOperator] | None = None,
        experiment_trackers: Mapping[str, ExperimentTracker] | None = None,
    ) -> Stack:
        """A new stack sharing this one's stores, with components added or replaced."""
        clone = Stack.__new__(Stack)
        clone.__dict__.update(self.__dict__)
        clone.alerter = alerter if alerter is not None else self.alerter
        clone.step_operators = {**self.step_operators, **(step_operators or {})}
        clone.experiment_trackers = {**self.experiment_trackers, **(experiment_trackers or {})}
        return clone

    def with_pools(self, **limits: int) -> Stack:
        """A new stack sharing this one's stores, with pools added: at most `limit` bodies of
        steps holding a pool (`@step(pool="gpu")`) run at once across every run on the stack,
        in this process and in every process sharing its metadata store.

        Raises:
            ConfigError: a limit that is not a whole number >= 1.
        """
        clone = Stack.__new__(Stack)
        clone.__dict__.update(self.__dict__)
        clone.pools = self.pools.merged(limits)
        return clone

    @property
    def is_in_memory(self) -> bool:
        return self._shared_store is not None

    async def metadata_store(self) -> MetadataStore:
        """The metadata store for the running event loop, opened on first use."""
        if self._shared_store is not None:
            if not self._artifacts_checked:
                await self.artifact_store.open()
                self._artifacts_checked = True
            return self._shared_store
        loop = asyncio.get_running_loop()
        entry = self._per_loop.get(loop)
        if entry is None:
            entry = self._per_loop[loop] = _LoopStore()
        if entry.store is not None:
            return entry.store
        async with entry.lock:
            if entry.store is None:
                assert self._factory is not None
                # The artifact store is checked first: a bucket that is missing or an endpoint
                # that cannot be reached is named before any step runs.
                await self.artifact_store.open()
                store = self._factory(self.artifact_store)
                await store.open()
                # Each `asyncio.run(p.run())` is a new loop, hence a new connection and its
                # thread, and nothing tells us when the caller is done with them; but
                # asyncio.run (and anyio, pytest-asyncio, asyncio.Runner) ends a loop with
                # `shutdown_asyncgens()`, which closes every async generator started on it and
                # still suspended. This one's `finally` closes the store: the connection lives
                # exactly as long as its loop, at no cost per run and with no thread or
                # callback watching. (A done-callback on the calling task would close it after
                # every run; a weakref finalizer on the loop runs after the loop is closed, when
                # the store can no longer be awaited.) The loop keeps only a weak reference to
                # the generator: `entry.closer` is the strong one.
                closer = self._close_with_loop(entry, store)
                await anext(closer)
                entry.store, entry.closer = store, closer
        assert entry.store is not None
        return entry.store

    async def _close_with_loop(self, entry: _LoopStore, store: MetadataStore
                               ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            loop = asyncio.get_running_loop()
            if self._per_loop.get(loop) is entry:
                del self._per_loop[loop]
            entry.store = entry.closer = None
            await store.close()

    async def open(self) -> Stack:
        """Open the stores on the running loop now (a durable store then marks the runs of dead
        processes CRASHED at once) and return the stack."""
        await self.metadata_store()
        return self

    async def aclose(self) -> None:
        """Stop every run this process still has live on the stack (each ends STOPPED and is
        recorded), wait for their writes, then release the stack's connections and pools."""
        await self.live_runs.stop_all(drain=False)
        await self.close()

    async def __aenter__(self) -> Stack:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __enter__(self) -> Stack:
        """From synchronous code: `with stack:` opens it (crash marking included) and closes
        it at the end, stopping the runs this process still has on it.

        Raises:
            SyncCallOnLoopError: on a thread whose event loop is running (use `async with`).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self.open())
            return self
        raise SyncCallOnLoopError(
            f"`with {self!r}:` was used on a thread whose event loop is running; use "
            "`async with stack:` there instead"
        )

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run(self.aclose())

    async def close(self) -> None:
        """Close what was opened on the running loop: the store and the step operators' pools
        and clusters (the next use opens them again). The loop's shutdown closes its store
        by itself (see `metadata_store`)."""
        for operator in self.step_operators.values():
            await operator.stop()
        if self._shared_store is not None:
            return
        entry = self._per_loop.get(asyncio.get_running_loop())
        if entry is not None and entry.closer is not None:
            closer, entry.closer = entry.closer, None  # a concurrent close() must not re-enter it
            await closer.aclose()

    def step_operator(self, name: str | None) -> StepOperator:
        """The operator named `name`, or the local one for None."""
        if name is None:
            return self.local_operator
        try:
            return self.step_operators[name]
        except KeyError:
            raise ConfigError(self._unknown("step_operator", name, self.step_operators)) from None

    def experiment_tracker(self, name: str) -> ExperimentTracker:
        try:
            return self.experiment_trackers[name]
        except KeyError:
            raise ConfigError(
                self._unknown("experiment_tracker", name, self.experiment_trackers)
            ) from None

    def _unknown(self, kind: str, name: str, known: Mapping[str, Any]) -> str:
        names = ", ".join(sorted(known)) or "none"
        return f"the stack has no {kind} named '{name}' (it has: {names})"


_default_stacks: dict[Path, Stack] = {}
_active_stack: Stack | None = None


def set_active_stack(stack: Stack | None) -> None:
    """Make `stack` the one runs and clients use when none is given (None: back to default)."""
    global _active_stack
    _active_stack = stack


def get_active_stack() -> Stack:
    """The active stack: set_active_stack(), else `$FLOWCORE_STACK` (a YAML path), else the
    default local stack under `$FLOWCORE_HOME`."""
    if _active_stack is not None:
        return _active_stack
    yaml_path = os.environ.get("FLOWCORE_STACK")
    if yaml_path:
        stack = _yaml_stacks.get(yaml_path)
        if stack is None:
            stack = _yaml_stacks[yaml_path] = Stack.from_yaml(yaml_path)
        return stack
    return Stack.default()


_yaml_stacks: dict[str, Stack] = {}
