"""The PostgreSQL metadata store (API.md §18): the SQLite store's schema and behaviour on a
server every host can reach, through asyncpg (extra `postgres`).

Per store (one per event loop, as the stack makes them): a writer connection that group-
commits queued writes, a small pool of reader connections, and a listener connection on
which cancel requests for this process's runs arrive (LISTEN/NOTIFY). Crash detection is by
heartbeat on the database's clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from flowcore._batching import Coalescer
from flowcore._models import ArtifactVersion, PipelineRun, RunStatus, StepRun
from flowcore.exceptions import ConfigError
from flowcore.stores import _postgres_control as control
from flowcore.stores import _postgres_ops as ops
from flowcore.stores import _postgres_reads as reads
from flowcore.stores._base import ArtifactStore, MetadataStore
from flowcore.stores._postgres_errors import PgErrors, server_label
from flowcore.stores._postgres_schema import migrate
from flowcore.stores._postgres_writer import WriteQueue
from flowcore.stores._sqlite import _BEAT_EVERY, _TICK, LEASE_TTL

__all__ = ["PostgresMetadataStore"]

T = TypeVar("T")
_logger = logging.getLogger("flowcore")

# Runs this process is executing (any store instance, any event loop): never judged dead here,
# whatever their heartbeat says (a loop busy for a while must not crash its own runs).
_LIVE_HERE: set[str] = set()
_READERS = 4


async def _no_reset(conn: Any) -> None:
    """Readers leave no session state behind (each read closes its own transaction), so the
    pool's reset round trip on every release is skipped."""


def _load_asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError as exc:
        raise ConfigError(
            "a postgresql:// metadata store needs asyncpg: pip install flowcore[postgres]"
        ) from exc
    return asyncpg


class PostgresMetadataStore(MetadataStore):
    """Runs, step runs, artifact rows, the cache index, cancel requests and pool leases in a
    PostgreSQL database shared by any number of processes and hosts.

    Args:
        url: `postgresql://user[:password]@host[:port]/database[?options]` (or `postgres://`).
        artifact_store: binds loaders to the artifacts read back.
        heartbeat_timeout: a RUNNING run whose heartbeat is older than this (seconds, by the
            database's clock) is considered crashed, unless this process runs it. Its runs
            heartbeat at most every 5 s, and more often when this is short.
        connect_timeout: seconds to wait for the server when opening.
    """

    def __init__(self, url: str, artifact_store: ArtifactStore, *,
                 heartbeat_timeout: float = 60.0, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.label = server_label(url)
        self.artifact_store = artifact_store
        self._stale_after = timedelta(seconds=heartbeat_timeout)
        self._lapse = float(heartbeat_timeout)
        self._beat_every = min(_BEAT_EVERY, self._lapse / 4)
        # A lease lapses with its holder's heartbeat: never later than a run would be judged dead.
        self._lease_ttl = min(LEASE_TTL, self._lapse)
        self._renew_every = self._lease_ttl * 0.3
        self._connect_timeout = connect_timeout
        self._host = control.process_space()
        self._asyncpg: Any = None
        self._errors: PgErrors | None = None
        self._writer: Any = None
        self._readers: Any = None
        self._listener: Any = None
        self._open_lock: asyncio.Lock | None = None
        self._writes = WriteQueue(lambda: self._writer, self._translate)
        # Step runs whose row exists (created with their run, or written once): their status
        # writes carry no config, which is written once, with the row.
        self._known_steps: set[str] = set()
        self._beats: dict[str, float] = {}  # run id -> monotonic time of its last heartbeat
        self._lookups: Coalescer[str, StepRun | None] = Coalescer(self._find_cached_many)
        self._explains: Coalescer[tuple[str, str], dict[str, str] | None] = Coalescer(
            self._find_components_many)
        self._held: set[tuple[str, str]] = set()
        self._next_renewal = 0.0
        self._next_cancel_check = 0.0
        self._next_beat = 0.0

    @property
    def writer_wakeups(self) -> int:
        """How often the serving writer task resumed."""
        return self._writes.wakeups

    @property
    def commits(self) -> int:
        """How many group-commit batches this store wrote."""
        return self._writes.commits

    def __repr__(self) -> str:
        return f"<PostgresMetadataStore {self.label} {'open' if self._writer else 'closed'}>"

    # -- connections ------------------------------------------------------------------------

    def _translate(self, exc: BaseException, operation: str) -> BaseException:
        return exc if self._errors is None else self._errors.translate(exc, operation)

    async def open(self) -> None:
        if self._writer is not None:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._writer is not None:
                return
            self._asyncpg = pg = _load_asyncpg()
            self._errors = errors = PgErrors(self.label, pg)
            connect = partial(pg.connect, self.url, timeout=self._connect_timeout)
            opened: list[Any] = []
            try:
                with errors("opening"):
                    writer = await connect()
                    opened.append(writer)
                    await migrate(writer, self.label)
                    readers = await pg.create_pool(
                        self.url, min_size=1, max_size=_READERS, timeout=self._connect_timeout,
                        reset=_no_reset)
                    opened.append(readers)
                    listener = await connect()
                    opened.append(listener)
                    await listener.add_listener(control.CANCEL_CHANNEL, self._heard)
            except BaseException:
                for conn in reversed(opened):
                    conn.terminate()
                raise
            self._writer, self._readers, self._listener = writer, readers, listener
        await self.mark_crashed_runs()

    async def close(self) -> None:
        if self._writer is None:
            return
        # Writes already queued were promised to their callers: let them commit first.
        await self._writes.drain()
        conns = [self._listener, self._readers, self._writer]
        self._writer = self._readers = self._listener = None
        assert self._errors is not None
        with self._errors("closing"):
            for conn in conns:
                await conn.close()

    def _heard(self, conn: Any, pid: int, channel: str, run_id: str) -> None:
        """A cancel request was committed somewhere: if the run is ours, look now."""
        if run_id in self._cancel_watchers.ids():
            self._next_cancel_check = 0.0
            self._writes.poke()

    async def _ready(self) -> PgErrors:
        if self._writer is None:
            await self.open()
        assert self._errors is not None
        return self._errors

    async def _write(self, op: Any, step_key: str = "") -> Any:
        await self._ready()
        return await self._writes.write(op, step_key)

    async def _read(self, read: Callable[[Any], Awaitable[T]], operation: str = "reading") -> T:
        errors = await self._ready()
        with errors(operation):
            async with self._readers.acquire() as conn:
                return await read(conn)

    # -- MetadataStore ----------------------------------------------------------------------

    async def create_run(self, run: PipelineRun) -> None:
        _LIVE_HERE.add(run.id)
        try:
            await self._write(ops.insert_run(run, pid=os.getpid(), host=self._host))
        except BaseException:
            _LIVE_HERE.discard(run.id)
            raise
        self._beats[run.id] = time.monotonic()
        self._known_steps.update(sr.id for sr in run.steps.values())

    async def update_run(self, run: PipelineRun) -> None:
        await self._write(ops.run_write(run))
        if run.status.is_finished:
            _LIVE_HERE.discard(run.id)
            self._beats.pop(run.id, None)
            self._known_steps.difference_update(sr.id for sr in run.steps.values())

    def _step_write(self, run: PipelineRun, step_run: StepRun) -> ops.StepWrite:
        # A step write refreshes its run's heartbeat at most every few seconds: enough for
        # crash detection, without an extra row update per write.
        now = time.monotonic()
        last = self._beats.get(run.id)
        beat = last is None or now - last >= self._beat_every
        if beat:
            self._beats[run.id] = now
        known = step_run.id in self._known_steps
        if not known and run.id in self._beats:  # a live run of ours: remember its new row
            self._known_steps.add(step_run.id)
        return ops.step_write(run, step_run, beat=beat, with_config=not known)

    async def update_step_run(self, run: PipelineRun, step_run: StepRun) -> None:
        await self._write(self._step_write(run, step_run), step_run.id)

    def record_step_run(self, run: PipelineRun, step_run: StepRun) -> None:
        self._writes.record(step_run.id, self._step_write(run, step_run))

    async def serve_writes(self) -> None:
        """Commit queued writes as they arrive, until cancelled (one call serves at a time).

        While a run of this process is watched, the serving call also heartbeats the
        process's live runs and, as a fallback for a lost notification, looks for cancel
        requests; while a lease is held, it renews it. Otherwise it sleeps until a write
        arrives (or a notification pokes it).
        """
        await self._ready()
        await self._writes.serve(self._tick_every, self._tick)

    def _tick_every(self) -> float | None:
        due = []
        if self._cancel_watchers:
            due += [self._next_beat, self._next_cancel_check]
        if self._held:
            due.append(self._next_renewal)
        if not due:
            return None
        return max(0.01, min(due) - time.monotonic())

    async def _tick(self) -> None:
        now = time.monotonic()
        watched = self._cancel_watchers.ids()
        if watched and now >= self._next_beat:
            self._next_beat = now + self._beat_every
            await self._write(ops.Beats(watched))
        if watched and now >= self._next_cancel_check:
            # Notifications wake us at once; this is the fallback for one lost with the
            # listener's connection (then about once a second, as SQLite does).
            listening = self._listener is not None and not self._listener.is_closed()
            self._next_cancel_check = now + (self._beat_every if listening else _TICK * 0.8)
            await self._deliver_cancels(watched)
        if self._held and now >= self._next_renewal:
            await self._renew_leases()

    async def flush(self) -> None:
        """Commit the writes queued before this call (and whatever shares their batches)."""
        await self._writes.flush()

    # -- run control (API.md §15-16) ----------------------------------------------------------

    async def request_cancel(self, run_id: str, drain: bool) -> RunStatus:
        found, status = await self._read(partial(
            control.request_cancel, name_or_id=run_id, drain=drain, live=self._liveness()),
            "cancelling")
        if status is RunStatus.CRASHED:
            _logger.warning("run_crashed: run '%s' was RUNNING but its process is gone; "
                            "marked CRASHED", run_id)
        elif status is RunStatus.RUNNING and found in self._cancel_watchers.ids():
            self._next_cancel_check = 0.0  # run by this very store: deliver now
            self._writes.poke()
        return status

    def watch_cancels(self, run_id: str, stop: Callable[[bool], None]) -> None:
        super().watch_cancels(run_id, stop)
        # A request made before the watch is in the database already: look at once.
        self._next_cancel_check = 0.0
        self._writes.poke()

    async def run_is_live(self, run_id: str) -> bool:
        return await self._read(partial(control.run_is_live, name_or_id=run_id,
                                        live=self._liveness()))

    def _liveness(self) -> control.Liveness:
        return control.Liveness(self._host, self._lapse, frozenset(_LIVE_HERE))

    async def _deliver_cancels(self, run_ids: list[str]) -> None:
        found = await self._read(partial(control.pending_cancels, run_ids=run_ids))
        if not found:
            return
        # Deleted before delivery: a request is delivered once, even if we are cancelled here.
        await self._read(partial(control.drop_cancels, taken=found), "writing")
        for run_id, drain, _ in found:
            self._cancel_watchers.deliver(run_id, drain)

    async def acquire_slot(self, pool: str, limit: int, holder: str) -> bool:
        taken = await self._read(partial(
            control.acquire_slot, pool=pool, limit=limit, holder=holder, ttl=self._lease_ttl,
            pid=os.getpid(), host=self._host), "taking a pool slot")
        if taken:
            if not self._held:
                self._next_renewal = time.monotonic() + self._renew_every
            self._held.add((pool, holder))
            self._writes.poke()  # the serving writer starts renewing
        return taken

    async def release_slot(self, pool: str, holder: str) -> None:
        self._held.discard((pool, holder))
        await self._read(partial(control.release_slot, pool=pool, holder=holder),
                         "giving a pool slot back")

    async def _renew_leases(self) -> None:
        self._next_renewal = time.monotonic() + self._renew_every
        await self._read(partial(control.renew_slots, held=list(self._held), ttl=self._lease_ttl),
                         "renewing pool leases")

    async def heartbeat(self, run: PipelineRun) -> None:
        """Record that `run`'s process is alive; the leases this store holds are renewed too."""
        await self._write(ops.Beats([run.id]))
        if self._held:
            await self._renew_leases()

    # -- reads ------------------------------------------------------------------------------

    async def get_run(self, name_or_id: str) -> PipelineRun:
        return self._bind_run(await self._read(partial(reads.read_run, name_or_id=name_or_id)))

    async def list_runs(
        self,
        pipeline_name: str | None = None,
        status: RunStatus | str | None = None,
        limit: int = 50,
    ) -> list[PipelineRun]:
        wanted = RunStatus(status) if status is not None else None
        runs = await self._read(partial(reads.list_runs, pipeline_name=pipeline_name,
                                        status=wanted, limit=limit))
        return [self._bind_run(run) for run in runs]

    async def get_step_logs(self, step_run_id: str) -> str:
        return await self._read(partial(reads.read_step_logs, step_run_id=step_run_id))

    async def get_artifact(self, artifact_id: str) -> ArtifactVersion:
        artifact = await self._read(partial(reads.read_artifact, artifact_id=artifact_id))
        return self.artifact_store.bind(artifact)

    async def find_cached(self, cache_key: str) -> StepRun | None:
        # Lookups that arrive while one is in flight are answered together by the next query.
        return await self._lookups(cache_key)

    async def _find_cached_many(self, keys: list[str]) -> list[Any]:
        found = await self._read(partial(reads.find_cached_many,
                                         cache_keys=list(dict.fromkeys(keys))))
        for step_run in found.values():
            self._bind_step(step_run)
        return [found.get(key) for key in keys]

    async def find_latest_cache_components(self, pipeline_run_id: str, step_name: str
                                           ) -> dict[str, str] | None:
        return await self._explains((pipeline_run_id, step_name))

    async def _find_components_many(self, items: list[tuple[str, str]]) -> list[Any]:
        return await self._read(partial(reads.find_latest_cache_components_many, items=items))

    async def delete_run(self, name_or_id: str) -> None:
        await self._write(ops.delete_run(name_or_id))

    async def clear_cache(self, pipeline_name: str | None = None) -> int:
        count: int = await self._write(ops.clear_cache(pipeline_name))
        return count

    async def mark_crashed_runs(self) -> list[str]:
        """Mark CRASHED the RUNNING runs whose heartbeat lapsed (by the database's clock), or
        whose pid is gone in this process space, and that this process does not run; return
        their names. In the same statement, the
        unfinished step rows of finished runs are marked STOPPED. Called by `open()`."""
        live = self._liveness()
        names, stopped = await self._write(ops.mark_crashed(
            self._lapse, sorted(live.live_here), self._host, live.pid_gone))
        for name in names:
            _logger.warning("run_crashed: run '%s' was RUNNING but its process is gone; "
                            "marked CRASHED", name)
        if stopped:
            _logger.warning("steps_stopped: %d step run(s) of finished runs were still "
                            "pending, running or retrying; marked STOPPED", stopped)
        return list(names)

    def _bind_step(self, step_run: StepRun) -> None:
        for name, artifact in step_run.outputs.items():
            step_run.outputs[name] = self.artifact_store.bind(artifact)

    def _bind_run(self, run: PipelineRun) -> PipelineRun:
        for step_run in run.steps.values():
            self._bind_step(step_run)
        return run
