"""The SQLite metadata store: one aiosqlite connection, group-committed writes, crash detection."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from flowcore._batching import Coalescer
from flowcore._models import ArtifactVersion, PipelineRun, RunStatus, StepRun
from flowcore.exceptions import StoreError
from flowcore.stores import _sqlite_control as control
from flowcore.stores import _sqlite_ops as ops
from flowcore.stores import _sqlite_reads as reads
from flowcore.stores._base import ArtifactStore, MetadataStore
from flowcore.stores._local import LocalArtifactStore
from flowcore.stores._sqlite_catchup import caught_up
from flowcore.stores._sqlite_commit import Connection
from flowcore.stores._sqlite_errors import StoreErrors
from flowcore.stores._sqlite_inline import is_inline, with_payload
from flowcore.stores._sqlite_schema import migrate
from flowcore.stores._sqlite_steps import StepWrite
from flowcore.stores._sqlite_writer import WriteQueue

__all__ = ["SqliteMetadataStore"]

T = TypeVar("T")
_logger = logging.getLogger("flowcore")

# Runs this process is executing. A RUNNING row with our own pid that is not in here was left
# by an earlier process that had the same pid (pids are reused, e.g. in containers).
_LIVE_RUN_IDS: set[str] = set()


_BEAT_EVERY = 5.0  # seconds
# While a run of this process is watched for cancel requests (or holds a pool lease), the
# writer task wakes at least this often to look for requests (API.md §15: "within about a
# second") and renew leases.
_TICK = 1.0
# A pool lease lapses this long after its last renewal (API.md §16: a killed process frees
# its slots within about 10 s); the holder renews it every _RENEW_EVERY.
LEASE_TTL = 10.0
_RENEW_EVERY = 3.0


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

    Beside the local artifact store, small outputs are kept inline, in their artifact row
    (see `_sqlite_inline`): no file is written for them.

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

    # Writes are committed in the order they were queued and every read first waits for the
    # writes this process queued on the file (see _sqlite_catchup): the engine need not wait
    # for a step's commit before its dependents start.
    reads_own_writes = True

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
        if isinstance(artifact_store, LocalArtifactStore):
            artifact_store.keep_inline()  # this store's rows hold small values' bytes
        self._busy_timeout = busy_timeout
        self._stale_after = timedelta(seconds=heartbeat_timeout)
        self._host = socket.gethostname()
        self._errors = StoreErrors(self.path, busy_timeout)
        self._db: Connection | None = None
        self._open_lock: asyncio.Lock | None = None
        self._writes = WriteQueue(self._errors, lambda: self._db)
        self._writes.register(str(self.path))
        self._beats: dict[str, datetime] = {}  # run id -> last heartbeat written
        self._lookups: Coalescer[str, StepRun | None] = Coalescer(self._find_cached_many)
        self._explains: Coalescer[tuple[str, str], dict[str, str] | None] = Coalescer(
            self._find_components_many)
        self._held: set[tuple[str, str]] = set()  # pool leases this store took: (pool, holder)
        self._next_renewal = 0.0
        self._next_cancel_check = 0.0
        self._next_beat = 0.0

    @property
    def writer_wakeups(self) -> int:
        """How often the serving writer task resumed (measured by the load tests)."""
        return self._writes.wakeups

    @property
    def commits(self) -> int:
        """How many group-commit batches this store wrote."""
        return self._writes.commits

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
        await self._writes.drain()
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
        """Queue a write and wait for its group commit (see WriteQueue.write)."""
        await self._connection()
        return await self._writes.write(write, step_key)

    async def _read(self, read: Callable[[sqlite3.Connection], T], *, own_writes: bool = True) -> T:
        db = await self._connection()
        if own_writes:
            # Steps' rows are committed behind their dependents' start: a read sees what this
            # process queued before it, as if every write had been awaited. (Not for the
            # writer's own tick: waiting for its queue there would wait for itself.)
            await caught_up(str(self.path))
        with self._errors("reading"):
            return await db.run(partial(reads.read_snapshot, read=read))

    # -- MetadataStore ----------------------------------------------------------------------

    async def create_run(self, run: PipelineRun) -> None:
        _LIVE_RUN_IDS.add(run.id)
        steps = ops.insert_step_rows(run)
        try:
            # Awaited: a used run name must fail the run before any step starts.
            await self._write(ops.insert_run(run, pid=os.getpid(), host=self._host, now=_now()))
        except BaseException:
            _LIVE_RUN_IDS.discard(run.id)
            raise
        if steps is not None:
            # The step rows are queued, not awaited: the first steps start while the writer
            # inserts them (a 1,000-step plan takes ~10 ms to insert). Every write of a step
            # is queued after them, and queued writes commit in order; a read waits for them
            # (reads_own_writes). A process killed in between leaves a run without step rows,
            # marked CRASHED like any other.
            self._writes.record(f"steps of run {run.id}", steps)

    async def update_run(self, run: PipelineRun) -> None:
        await self._write(ops.update_run(run, _now()))
        if run.status.is_finished:
            _LIVE_RUN_IDS.discard(run.id)
            self._beats.pop(run.id, None)

    async def update_step_run(self, run: PipelineRun, step_run: StepRun) -> None:
        await self._write(self._step_write(run, step_run), step_run.id)

    def _step_write(self, run: PipelineRun, step_run: StepRun) -> StepWrite:
        now = _now()
        # A step write refreshes the run's heartbeat at most every few seconds: enough for
        # crash detection, without an extra statement per write.
        last = self._beats.get(run.id)
        beat = last is None or (now - last).total_seconds() >= _BEAT_EVERY
        if beat:
            self._beats[run.id] = now
        return StepWrite(run, step_run, now, beat=beat)

    def record_step_run(self, run: PipelineRun, step_run: StepRun) -> None:
        self._writes.record(step_run.id, self._step_write(run, step_run))

    async def serve_writes(self) -> None:
        """Commit queued writes as they arrive, until cancelled.

        Every run calls this on its loop's store; one call serves at a time and the others
        wait their turn (first come, first served), so a queued write wakes one task, not one
        per run. While a run of this process is watched for cancel requests, or a pool lease
        is held, the serving call also wakes about once a second to deliver requests and renew
        leases; otherwise it sleeps until a write arrives.
        """
        await self._connection()
        await self._writes.serve(self._tick_every, self._tick)

    def _tick_every(self) -> float | None:
        return _TICK if self._cancel_watchers or self._held else None

    async def _tick(self) -> None:
        now = time.monotonic()
        if self._cancel_watchers and now >= self._next_beat:
            # The heartbeat of every run this process has live on the store, by the writer
            # that already wakes for cancel requests: no heartbeat task per run.
            self._next_beat = now + _BEAT_EVERY
            await self._write(ops.heartbeats(list(self._cancel_watchers.ids()), _now()))
        if self._cancel_watchers and now >= self._next_cancel_check:
            # At most one query a tick, however busy the writer is.
            self._next_cancel_check = now + _TICK * 0.8
            await self._deliver_cancels()
        if self._held and now >= self._next_renewal:
            await self._renew_leases()

    async def flush(self) -> None:
        """Commit the writes queued before this call (and whatever shares their batches)."""
        await self._writes.flush()

    # -- run control (API.md §15-16) ----------------------------------------------------------

    def _liveness(self) -> control.Liveness:
        return control.Liveness(host=self._host, now=_now(), stale_after=self._stale_after,
                                is_dead=_is_dead)

    async def request_cancel(self, run_id: str, drain: bool) -> RunStatus:
        found, status = await self._write(partial(
            control.request_cancel, name_or_id=run_id, drain=drain, live=self._liveness()))
        if status is RunStatus.CRASHED:
            _logger.warning("run_crashed: run '%s' was RUNNING but its process is gone; "
                            "marked CRASHED", run_id)
        elif status is RunStatus.RUNNING and found in self._cancel_watchers.ids():
            # Run by this very store: the writer delivers it now, not at its next tick.
            self._next_cancel_check = 0.0
            self._writes.poke()
        return status

    def watch_cancels(self, run_id: str, stop: Callable[[bool], None]) -> None:
        super().watch_cancels(run_id, stop)
        self._writes.poke()  # the serving writer starts ticking now, not at the next write

    async def run_is_live(self, run_id: str) -> bool:
        return await self._read(partial(control.run_is_live, name_or_id=run_id,
                                        live=self._liveness()))

    async def _deliver_cancels(self) -> None:
        found = await self._read(partial(control.pending_cancels,
                                         run_ids=self._cancel_watchers.ids()), own_writes=False)
        if not found:
            return
        # Deleted before delivery: a request is delivered once, even if we are cancelled here.
        await self._write(partial(control.drop_cancels, taken=found))
        for run_id, drain, _ in found:
            self._cancel_watchers.deliver(run_id, drain)

    async def acquire_slot(self, pool: str, limit: int, holder: str) -> bool:
        taken = await self._write(partial(
            control.acquire_slot, pool=pool, limit=limit, holder=holder, now=time.time(),
            ttl=LEASE_TTL, pid=os.getpid(), host=self._host,
            pid_dead=lambda pid: not _pid_alive(pid)))
        if taken:
            if not self._held:
                self._next_renewal = time.monotonic() + _RENEW_EVERY
            self._held.add((pool, holder))
            self._writes.poke()  # the serving writer starts renewing
        return taken

    async def release_slot(self, pool: str, holder: str) -> None:
        self._held.discard((pool, holder))
        await self._write(partial(control.release_slot, pool=pool, holder=holder))

    async def _renew_leases(self) -> None:
        self._next_renewal = time.monotonic() + _RENEW_EVERY
        await self._write(partial(control.renew_slots, held=list(self._held),
                                  expires=time.time() + LEASE_TTL))

    async def heartbeat(self, run: PipelineRun) -> None:
        """Record that `run`'s process is alive (the runner calls this periodically); the
        pool leases this store holds are renewed in the same write."""
        beat = ops.heartbeat(run.id, _now())
        if not self._held:
            await self._write(beat)
            return
        held, expires = list(self._held), time.time() + LEASE_TTL
        self._next_renewal = time.monotonic() + _RENEW_EVERY

        def write(db: sqlite3.Connection) -> None:
            beat(db)
            control.renew_slots(db, held, expires)

        await self._write(write)

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
        return self._bind_artifact(artifact)

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

    def _bind_artifact(self, artifact: ArtifactVersion) -> ArtifactVersion:
        if is_inline(artifact):  # its bytes came with its row
            return with_payload(artifact, artifact._value)
        artifact._value = None  # the content column is NULL for these
        return self.artifact_store.bind(artifact)

    def _bind_step(self, step_run: StepRun) -> None:
        for name, artifact in step_run.outputs.items():
            step_run.outputs[name] = self._bind_artifact(artifact)

    def _bind_run(self, run: PipelineRun) -> PipelineRun:
        for step_run in run.steps.values():
            self._bind_step(step_run)
        return run
