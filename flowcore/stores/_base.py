"""The two storage interfaces the runner talks to: run metadata and artifact content."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from flowcore._models import ArtifactVersion, PipelineRun, RunStatus, StepRun
from flowcore.stores._control import CancelWatchers, Leases

__all__ = ["ArtifactStore", "MetadataStore"]


class MetadataStore(abc.ABC):
    """Where runs, step runs, artifact rows and the cache index live.

    Every method that changes state is one atomic transition: a cancellation or a crash
    between two calls never leaves half of one behind.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Open connections and create or migrate the schema; safe to call twice."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending writes and release connections."""

    @abc.abstractmethod
    async def create_run(self, run: PipelineRun) -> None:
        """Record a new RUNNING run with its PENDING step runs.

        Raises:
            RunNameConflictError: the run's name is already used in this store.
        """

    @abc.abstractmethod
    async def update_run(self, run: PipelineRun) -> None:
        """Store the run's status and end time."""

    @abc.abstractmethod
    async def update_step_run(self, run: PipelineRun, step_run: StepRun) -> None:
        """Store a step run's status, timings, attempts, error, cache key, hook errors and outputs."""

    @abc.abstractmethod
    async def get_run(self, name_or_id: str) -> PipelineRun:
        """Return a run by name or id.

        Raises:
            RunNotFoundError: no such run.
        """

    @abc.abstractmethod
    async def list_runs(
        self,
        pipeline_name: str | None = None,
        status: RunStatus | str | None = None,
        limit: int = 50,
    ) -> list[PipelineRun]:
        """Return listed runs, newest first."""

    @abc.abstractmethod
    async def get_artifact(self, artifact_id: str) -> ArtifactVersion:
        """Return one artifact version by id.

        Raises:
            ArtifactLoadError: no such artifact.
        """

    @abc.abstractmethod
    async def find_cached(self, cache_key: str) -> StepRun | None:
        """Return the newest COMPLETED step run stored under `cache_key`, or None."""

    async def find_latest_cache_components(self, pipeline_run_id: str, step_name: str
                                           ) -> dict[str, str] | None:
        """The cache key components of the newest step run named `step_name` (an invocation
        ID) that has them, in an earlier run of the same pipeline as run `pipeline_run_id`;
        None if there is none. Used only to explain a cache miss (one indexed query)."""
        return None

    async def get_step_logs(self, step_run_id: str) -> str:
        """What a step run printed and logged ('' if nothing was captured)."""
        raise NotImplementedError

    def record_step_run(self, run: PipelineRun, step_run: StepRun) -> None:
        """Queue the same write as `update_step_run` without waiting for it.

        The write is committed promptly by `serve_writes()` (which the runner runs for the
        length of a run) and at the latest by `flush()`.
        """
        raise NotImplementedError

    async def serve_writes(self) -> None:
        """Commit queued writes as they arrive, until cancelled (the default has none)."""
        return None

    async def flush(self) -> None:
        """Commit every queued write; raises StoreError if a queued write failed."""
        return None

    async def delete_run(self, name_or_id: str) -> None:
        """Delete a run and its step runs (artifacts stay until garbage-collected)."""
        raise NotImplementedError

    async def clear_cache(self, pipeline_name: str | None = None) -> int:
        """Forget cache entries (of one pipeline, or all); returns how many."""
        raise NotImplementedError

    # -- run control (API.md §15-16) ----------------------------------------------------------
    # The defaults suit a store that lives in one process (every RUNNING run in it is run by
    # this process); a store shared by processes overrides them.

    @property
    def _cancel_watchers(self) -> CancelWatchers:
        found: CancelWatchers | None = self.__dict__.get("_watchers_state")
        if found is None:
            found = self.__dict__["_watchers_state"] = CancelWatchers()
        return found

    @property
    def _leases(self) -> Leases:
        found: Leases | None = self.__dict__.get("_leases_state")
        if found is None:
            found = self.__dict__["_leases_state"] = Leases()
        return found

    async def request_cancel(self, run_id: str, drain: bool) -> RunStatus:
        """Ask whoever runs run `run_id` (a name works too) to stop it; return its status.

        A finished run is left alone and its status returned. A RUNNING run whose process is
        gone is marked CRASHED at once (its unfinished steps STOPPED, pending ones SKIPPED)
        and CRASHED is returned. Otherwise the request is recorded, the run's process stops
        it (`drain`: running steps finish, nothing new starts) and RUNNING is returned.

        Raises:
            RunNotFoundError: no such run.
        """
        run = await self.get_run(run_id)
        if run.status.is_finished:
            return run.status
        self._cancel_watchers.deliver(run.id, drain, keep=True)
        return RunStatus.RUNNING

    def watch_cancels(self, run_id: str, stop: Callable[[bool], None]) -> None:
        """Call `stop(drain)` on this event loop, once per request, when run `run_id` (started
        in this process) is asked to stop. The engine calls this when the run starts."""
        self._cancel_watchers.add(run_id, stop)

    def unwatch_cancels(self, run_id: str) -> None:
        """Stop listening for run `run_id` (the engine calls this once its record is final)."""
        self._cancel_watchers.remove(run_id)

    async def run_is_live(self, run_id: str) -> bool:
        """Whether the run is RUNNING in a process that is still there.

        Raises:
            RunNotFoundError: no such run.
        """
        return (await self.get_run(run_id)).status is RunStatus.RUNNING

    async def acquire_slot(self, pool: str, limit: int, holder: str) -> bool:
        """Take one of the `limit` slots of `pool` for `holder` (a unique id, such as a step
        run's) if one is free; False if all are held. Taking a slot one already holds is true."""
        return self._leases.take(pool, limit, holder)

    async def release_slot(self, pool: str, holder: str) -> None:
        """Give `holder`'s slot of `pool` back (nothing if it holds none)."""
        self._leases.give_back(pool, holder)


class ArtifactStore(abc.ABC):
    """Where artifact content lives."""

    async def open(self) -> None:
        """Check the store can be reached (and create what it needs); raise StoreError or
        ConfigError naming it. The stack calls this before its first run starts a step."""
        return None

    @abc.abstractmethod
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
        """Store `value` with `materializer` and return its (not yet recorded) artifact version.

        `step_label` names the step in warnings and errors.
        """

    @abc.abstractmethod
    def exists(self, artifact: ArtifactVersion) -> bool:
        """Whether the artifact's content is still there (a cache hit needs it)."""

    async def verify(self, artifact: ArtifactVersion) -> str | None:
        """Why `artifact` cannot be reused by a cache hit, or None when it is sound.

        The reason is a short sentence naming the artifact: it is missing, damaged (its
        content no longer matches its stored hash) or no longer loadable (its type or
        materializer cannot be imported). Stores that can check more than `exists` override
        this; hashing anything but tiny content happens off the event loop.
        """
        if self.exists(artifact):
            return None
        return (f"artifact '{artifact.name}' (id {artifact.id}) of step run "
                f"{artifact.producer_step_run_id} at {artifact.uri} is missing")

    @abc.abstractmethod
    def bind(self, artifact: ArtifactVersion) -> ArtifactVersion:
        """Attach this store's loader to an artifact version read back from metadata."""
