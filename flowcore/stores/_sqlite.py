"""The SQLite metadata store: one aiosqlite connection, group-committed writes, crash detection."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import anyio.to_thread

from flowcore._batching import Coalescer
from flowcore._models import ArtifactVersion, PipelineRun, RunStatus, StepRun
from flowcore.exceptions import StoreError
from flowcore.stores import _sqlite_ops as ops
from flowcore.stores import _sqlite_reads as reads
from flowcore.stores._base import ArtifactStore, MetadataStore
from flowcore.stores._sqlite_commit import Connection, Pending, commit_batch, mark_retrieved, settle
from flowcore.stores._sqlite_errors import StoreErrors
from flowcore.stores._sqlite_schema import migrate

__all__ = ["SqliteMetadataStore"]

T = TypeVar("T")
_logger = logging.getLogger("flowcore")

# Runs this process is executing. A RUNNING row with our own pid that is not in here was left
# by an earlier process that had the same pid (pids are reused, e.g. in containers).
_LIVE_RUN_IDS: set[str] = set()


_BEAT_EVERY = 5.0  # seconds


def _now() -> datetime:
    return datetime.now(UTC)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # kill(0, ...) would address our whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _is_dead(pid: int | None, run_id: str) -> bool:
    if pid is None:
        return False
    if pid == os.getpid():
        return run_id not in _LIVE_RUN_IDS
    return not _pid_alive(pid)


class SqliteMetadataStore(MetadataStore):
    """Runs, step runs, artifact rows and the cache index in one SQLite file (WAL mode).

    Several processes may share the file. Writes are group-committed: while one transaction
    is being committed, later writes queue up and go together in the next one; each write
    is atomic on its own (a failing one is rolled back to its savepoint, the others commit).

    Args:
        path: the database file (its directory is created if missing).
        artifact_store: binds loaders to the artifacts read back.
        busy_timeout: seconds to wait for another process's write lock.
        heartbeat_timeout: a RUNNING run of another host whose heartbeat is older than this
            is considered crashed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        artifact_store: ArtifactStore,
        *,
        busy_timeout: float = 30.0,
        heartbeat_timeout: float = 60.0,
    ) -> None:
        self.path = Path(path).absolute()
        self.artifact_store = artifact_store
        self._busy_timeout = busy_timeout
        self._stale_after = timedelta(seconds=heartbeat_timeout)
        self._host = socket.gethostname()
        self._errors = StoreErrors(self.path, busy_timeout)
        self._db: Connection | None = None
        self._open_lock: asyncio.Lock | None = None
        self._queue: list[Pending] = []
        self._session: asyncio.Future[None] | None = None  # set while a committer runs
        self._beats: dict[str, datetime] = {}  # run id -> last heartbeat written
        self._wake: asyncio.Event | None = None  # set when record_step_run queued a write
        self._lost: list[BaseException] = []  # failed writes nobody awaited
        self._lookups: Coalescer[str, StepRun | None] = Coalescer(self._find_cached_many)
        self._explains: Coalescer[tuple[str, str], dict[str, str] | None] = Coalescer(
            self._find_components_many)
        # Step-run writes queued and not yet taken by a commit, by step run id.
        self._queued_steps: dict[str, Pending] = {}

    def __repr__(self) -> str:
        return f"<SqliteMetadataStore {self.path} {'open' if self._db else 'closed'}>"

    # -- connection -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._db is not None:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._db is not None:
                return
            await anyio.to_thread.run_sync(self._make_directory)
            with self._errors("opening"):
                db = await Connection.connect(self.path, self._busy_timeout)
                try:
                    await db.run(self._configure)
                    await db.run(partial(migrate, label=str(self.path)))
                except BaseException:
                    await db.close()
                    raise
            self._db = db
        await self.mark_crashed_runs()

    def _make_directory(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the directory {self.path.parent} for the metadata store: {exc}"
            ) from exc

    def _configure(self, db: sqlite3.Connection) -> None:
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        # WAL: readers (another process's client) never block the writer, nor it them.
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")

    async def close(self) -> None:
        if self._db is None:
            return
        # Writes already queued were promised to their callers: let them commit first.
        while self._session is not None:
            await asyncio.wait([self._session])
        db, self._db = self._db, None
        if db is not None:
            with self._errors("closing"):
                await db.close()

    async def _connection(self) -> Connection:
        if self._db is None:
            await self.open()
        assert self._db is not None
        return self._db

    # -- group commit -----------------------------------------------------------------------

    async def _write(self, write: Callable[[sqlite3.Connection], T], step_key: str = "") -> T:
        """Queue a write; the first writer to find no commit in flight commits the queue.

        A step-run write (`step_key` set) replaces the same step run's queued, unawaited write
        that no commit has taken yet: it carries the newer state, so a step that starts and
        ends between two commits costs one row write, not two.
        """
        await self._connection()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(mark_retrieved)
        queued = self._queued_steps.get(step_key) if step_key else None
        if queued is not None and queued.future is None and not queued.submitted:
            queued.write = write
            queued.future = future
            pending = queued
        else:
            pending = Pending(write, future)
            self._queue.append(pending)
        try:
            if self._session is None:
                await self._commit_queued()
            # A committer drains the queue before it stops, so our write is (or will be)
            # in one of its batches, and the connection thread settles our future.
            return cast(T, await future)
        except asyncio.CancelledError:
            if not pending.submitted and pending in self._queue:
                self._queue.remove(pending)  # it never reached the database
                if step_key and self._queued_steps.get(step_key) is pending:
                    del self._queued_steps[step_key]
            raise

    async def _commit_queued(self) -> None:
        session: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._session = session
        cancelled: asyncio.CancelledError | None = None
        try:
            while self._queue:
                # A writer cancelled while queued has had its future cancelled: drop its write.
                batch = [p for p in self._queue if p.future is None or not p.future.cancelled()]
                self._queue = []
                if not batch:
                    continue
                for pending in batch:
                    pending.submitted = True
                self._queued_steps.clear()
                db = self._db
                try:
                    with self._errors("writing"):
                        if db is None:
                            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
                        await db.run(partial(commit_batch, batch=batch, lost=self._lost_write,
                                             translate=partial(self._errors.translate,
                                                               operation="writing")))
                except asyncio.CancelledError as exc:
                    # The thread still commits this batch and settles its futures. Keep
                    # draining: writers queued behind us wait on us, not on a timer.
                    cancelled = exc
                except Exception as error:  # the batch never ran (e.g. the connection closed)
                    for pending in batch:
                        if pending.future is None:
                            self._lost_write(error)
                        else:
                            settle(pending.future, None, error)
        finally:
            self._session = None
            session.set_result(None)
        if cancelled is not None:
            raise cancelled

    async def _read(self, read: Callable[[sqlite3.Connection], T]) -> T:
        db = await self._connection()
        with self._errors("reading"):
            return await db.run(partial(reads.read_snapshot, read=read))

    # -- MetadataStore ----------------------------------------------------------------------

    async def create_run(self, run: PipelineRun) -> None:
        _LIVE_RUN_IDS.add(run.id)
        try:
            await self._write(ops.insert_run(run, pid=os.getpid(), host=self._host, now=_now()))
        except BaseException:
            _LIVE_RUN_IDS.discard(run.id)
            raise

    async def update_run(self, run: PipelineRun) -> None:
        await self._write(ops.update_run(run, _now()))
        if run.status.is_finished:
            _LIVE_RUN_IDS.discard(run.id)
            self._beats.pop(run.id, None)

    async def update_step_run(self, run: PipelineRun, step_run: StepRun) -> None:
        await self._write(self._step_write(run, step_run), step_run.id)

    def _step_write(self, run: PipelineRun, step_run: StepRun) -> Callable[[sqlite3.Connection], None]:
        now = _now()
        # A step write refreshes the run's heartbeat at most every few seconds: enough for
        # crash detection, without an extra statement per write.
        last = self._beats.get(run.id)
        beat = last is None or (now - last).total_seconds() >= _BEAT_EVERY
        if beat:
            self._beats[run.id] = now
        return ops.upsert_step_run(run, step_run, now, beat=beat)

    def record_step_run(self, run: PipelineRun, step_run: StepRun) -> None:
        write = self._step_write(run, step_run)
        queued = self._queued_steps.get(step_run.id)
        if queued is not None and not queued.submitted:
            queued.write = write  # newer state of the same step run (see _write)
            return
        pending = Pending(write, None)
        self._queue.append(pending)
        self._queued_steps[step_run.id] = pending
        if self._wake is not None:
            self._wake.set()

    async def serve_writes(self) -> None:
        await self._connection()
        if self._wake is None:
            self._wake = asyncio.Event()
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            if self._session is None and self._queue:
                await self._commit_queued()

    async def flush(self) -> None:
        if self._queue and self._session is None:
            await self._commit_queued()
        while self._session is not None:
            await asyncio.wait([self._session])
            if self._queue and self._session is None:
                await self._commit_queued()
        if self._lost:
            errors, self._lost = self._lost, []
            raise errors[0]

    def _lost_write(self, error: BaseException) -> None:
        # A queued write nobody awaited failed: remember it for the next flush().
        self._lost.append(error)

    async def heartbeat(self, run: PipelineRun) -> None:
        """Record that `run`'s process is alive (the runner calls this periodically)."""
        await self._write(ops.heartbeat(run.id, _now()))

    async def get_run(self, name_or_id: str) -> PipelineRun:
        return self._bind_run(await self._read(partial(reads.read_run, name_or_id=name_or_id)))

    async def list_runs(
        self,
        pipeline_name: str | None = None,
        status: RunStatus | str | None = None,
        limit: int = 50,
    ) -> list[PipelineRun]:
        wanted = RunStatus(status) if status is not None else None
        runs = await self._read(
            partial(reads.list_runs, pipeline_name=pipeline_name, status=wanted, limit=limit)
        )
        return [self._bind_run(run) for run in runs]

    async def get_step_logs(self, step_run_id: str) -> str:
        return await self._read(partial(reads.read_step_logs, step_run_id=step_run_id))

    async def get_artifact(self, artifact_id: str) -> ArtifactVersion:
        artifact = await self._read(partial(reads.read_artifact, artifact_id=artifact_id))
        return self.artifact_store.bind(artifact)

    async def find_cached(self, cache_key: str) -> StepRun | None:
        # Lookups that arrive while one is in flight are answered together by the next query
        # (a fully cached run asks for every step at once): one thread hop for many steps.
        return await self._lookups(cache_key)

    async def _find_cached_many(self, keys: list[str]) -> list[Any]:
        found = await self._read(partial(reads.find_cached_many, cache_keys=list(dict.fromkeys(keys))))
        for step_run in found.values():
            self._bind_step(step_run)
        return [found.get(key) for key in keys]

    async def find_latest_cache_components(self, pipeline_run_id: str, step_name: str
                                           ) -> dict[str, str] | None:
        # Misses that arrive together (a first run of a wide fan-out) share one thread hop.
        return await self._explains((pipeline_run_id, step_name))

    async def _find_components_many(self, items: list[tuple[str, str]]) -> list[Any]:
        return await self._read(partial(reads.find_latest_cache_components_many, items=items))

    async def delete_run(self, name_or_id: str) -> None:
        await self._write(partial(ops.delete_run, name_or_id=name_or_id))

    async def clear_cache(self, pipeline_name: str | None = None) -> int:
        return await self._write(partial(ops.clear_cache, pipeline_name=pipeline_name))

    async def mark_crashed_runs(self) -> list[str]:
        """Mark RUNNING runs whose process died as CRASHED; return their names.

        A run of this host is dead when its process is gone; a run of another host when its
        heartbeat is older than `heartbeat_timeout`. In the same transaction, the unfinished
        step rows of finished runs (left by a process that died between its last step write
        and its run write, or by an older flowcore) are marked STOPPED. Called by `open()`.
        """
        now = _now()
        crash = partial(ops.mark_crashed, host=self._host, now=now,
                        stale_after=self._stale_after, is_dead=_is_dead)

        def write(db: sqlite3.Connection) -> tuple[list[str], int]:
            names = crash(db)
            return names, ops.stop_orphaned_steps(db, now=now)

        names, stopped = await self._write(write)
        for name in names:
            _logger.warning("run_crashed: run '%s' was RUNNING but its process is gone; "
                            "marked CRASHED", name)
        if stopped:
            _logger.warning("steps_stopped: %d step run(s) of finished runs were still "
                            "pending, running or retrying; marked STOPPED", stopped)
        return names

    def _bind_step(self, step_run: StepRun) -> None:
        for name, artifact in step_run.outputs.items():
            step_run.outputs[name] = self.artifact_store.bind(artifact)

    def _bind_run(self, run: PipelineRun) -> PipelineRun:
        for step_run in run.steps.values():
            self._bind_step(step_run)
        return run
