"""The PostgreSQL store's write queue: group commit on the event loop, one serving writer,
and flushes that wait only for what was queued before them (the SQLite queue's rules).

A batch of status writes is one statement (one round trip, atomic on its own); a batch that
also holds writes with logic of their own runs in one transaction, in queue order. If any
write of a batch fails, the batch is rolled back and replayed one write per transaction, so
the failing write fails alone and the others commit, still in order. A batch that reached the
server is finished even if whoever committed it is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from flowcore.stores._postgres_ops import DATA_TYPES, Call, Data, StepWrite, apply_data, replaces
from flowcore.stores._sqlite_commit import mark_retrieved, settle
from flowcore.stores._sqlite_writer import WAKE_CHUNK, wake_in_chunks

__all__ = ["Pending", "WriteQueue"]

T = TypeVar("T")
Translate = Callable[[BaseException, str], BaseException]


@dataclass(eq=False, slots=True)
class Pending:
    """One write waiting for a group commit."""

    op: Data | Call
    future: asyncio.Future[Any] | None  # None: recorded, nobody awaits it
    submitted: bool = False


def _segments(batch: list[Pending]) -> list[list[Pending]]:
    """Consecutive status writes together (one statement each run), other writes alone."""
    out: list[list[Pending]] = []
    for p in batch:
        data = isinstance(p.op, DATA_TYPES)
        if data and out and isinstance(out[-1][0].op, DATA_TYPES):
            out[-1].append(p)
        else:
            out.append([p])
    return out


async def _apply(conn: Any, batch: list[Pending]) -> list[Any]:
    results: list[Any] = []
    for segment in _segments(batch):
        first = segment[0].op
        if isinstance(first, DATA_TYPES):
            await apply_data(conn, [cast(Data, p.op) for p in segment])
            results.extend([None] * len(segment))
        else:
            results.append(await first(conn))
    return results


async def commit_batch(conn: Any, batch: list[Pending]) -> list[tuple[Any, BaseException | None]]:
    """Apply `batch` and return each write's (result, error)."""
    single_statement = all(isinstance(p.op, DATA_TYPES) for p in batch)
    try:
        if single_statement:
            results = await _apply(conn, batch)
        else:
            async with conn.transaction():
                results = await _apply(conn, batch)
        return [(r, None) for r in results]
    except OSError:  # TimeoutError is one
        raise  # the connection is gone: the caller fails the whole batch
    except Exception as error:
        if conn.is_closed():
            raise
        if len(batch) == 1:
            return [(None, error)]
    outcomes: list[tuple[Any, BaseException | None]] = []
    for p in batch:
        try:
            async with conn.transaction():
                outcomes.append(((await _apply(conn, [p]))[0], None))
        except OSError:  # TimeoutError is one
            raise
        except Exception as error:
            if conn.is_closed():
                raise
            outcomes.append((None, error))
    return outcomes


async def _finish(task: asyncio.Task[T]) -> tuple[T, asyncio.CancelledError | None]:
    """Wait for `task` through any number of cancellations; return the first one too."""
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
            if task.done():
                # Cancelled just as the batch finished: its outcome still counts (raising here
                # would leave every other writer of the batch waiting forever).
                return task.result(), cancelled


def _settle_in_chunks(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
                      start: int = 0) -> None:
    """Settle awaited writes, WAKE_CHUNK per turn of the loop: hundreds of writers resuming in
    one iteration would hold the loop (see _sqlite_writer.WAKE_CHUNK)."""
    end = min(start + WAKE_CHUNK, len(settled))
    for future, result, error in settled[start:end]:
        settle(future, result, error)
    if end < len(settled):
        settled[end][0].get_loop().call_soon(_settle_in_chunks, settled, end)


class WriteQueue:
    """Queued writes of one store and whoever commits them (see the SQLite WriteQueue)."""

    def __init__(self, connection: Callable[[], Any], translate: Translate) -> None:
        self._connection = connection
        self._translate = translate
        self._queue: list[Pending] = []
        self._queued_steps: dict[str, Pending] = {}
        self._session: asyncio.Future[None] | None = None
        self._batch_waiters: deque[asyncio.Future[None]] = deque()
        self._enqueued = 0
        self._committed = 0
        self._lost: list[BaseException] = []
        self._wake: asyncio.Event | None = None
        self._serving = False
        self._turns: deque[asyncio.Future[None]] = deque()
        self.wakeups = 0
        self.commits = 0

    # -- queueing ---------------------------------------------------------------------------

    async def write(self, op: Data | Call, step_key: str = "") -> Any:
        """Queue a write and wait until it is committed; return its result. A step write
        replaces the same step run's queued, unawaited write no commit has taken yet."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(mark_retrieved)
        queued = self._queued_steps.get(step_key) if step_key else None
        if queued is not None and queued.future is None and not queued.submitted:
            queued.op = replaces(queued.op, op) if isinstance(op, StepWrite) else op
            queued.future = future
            pending = queued
        else:
            pending = Pending(op, future)
            self._queue.append(pending)
        self._enqueued += 1
        try:
            await self._until(self._enqueued)
            return await future
        except asyncio.CancelledError:
            if not pending.submitted and pending in self._queue:
                self._queue.remove(pending)  # it never reached the server
                if step_key and self._queued_steps.get(step_key) is pending:
                    del self._queued_steps[step_key]
            raise

    def record(self, step_key: str, op: StepWrite) -> None:
        """Queue a step write nobody awaits (the serving writer or a flush commits it)."""
        self._enqueued += 1
        queued = self._queued_steps.get(step_key)
        if queued is not None and not queued.submitted:
            queued.op = replaces(queued.op, op)  # the newer state of the same step run
            return
        pending = Pending(op, None)
        self._queue.append(pending)
        self._queued_steps[step_key] = pending
        self.poke()

    def poke(self) -> None:
        """Wake the serving writer (if any)."""
        if self._wake is not None:
            self._wake.set()

    async def flush(self) -> None:
        """Commit the writes queued before this call; raise the first lost write's error."""
        await self._until(self._enqueued)
        if self._lost:
            errors, self._lost = self._lost, []
            raise errors[0]

    async def drain(self) -> None:
        """Commit everything queued (before closing); errors stay for nobody."""
        while self._queue or self._session is not None:
            if self._session is None:
                await self._commit(until=None)
            else:
                await self._next_batch()

    # -- committing -------------------------------------------------------------------------

    async def _until(self, ticket: int) -> None:
        while self._committed < ticket:
            if self._session is None:
                if not self._queue:
                    return  # what remained was withdrawn by cancelled writers
                await self._commit(until=ticket)
            else:
                await self._next_batch()

    async def _next_batch(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._batch_waiters.append(waiter)
        await waiter

    def _batch_done(self, ticket: int) -> None:
        self._committed = max(self._committed, ticket)
        waiters, self._batch_waiters = self._batch_waiters, deque()
        wake_in_chunks(waiters)

    async def _commit(self, until: int | None) -> None:
        session: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._session = session
        cancelled: asyncio.CancelledError | None = None
        try:
            while self._queue and (until is None or self._committed < until):
                batch = [p for p in self._queue if p.future is None or not p.future.cancelled()]
                self._queue = []
                ticket = self._enqueued
                if batch:
                    cancelled = await self._commit_batch(batch) or cancelled
                    self.commits += 1
                self._batch_done(ticket)
        finally:
            self._session = None
            session.set_result(None)
            self._batch_done(self._committed)
        if cancelled is not None:
            raise cancelled

    async def _commit_batch(self, batch: list[Pending]) -> asyncio.CancelledError | None:
        for p in batch:
            p.submitted = True
        self._queued_steps.clear()
        conn = self._connection()
        cancelled: asyncio.CancelledError | None = None
        try:
            if conn is None:
                raise ConnectionError("the store is closed")
            # Once sent, a batch is finished even if we are cancelled: writers queued behind
            # us wait on us, and a half-applied group commit is what group commit rules out.
            task = asyncio.ensure_future(commit_batch(conn, batch))
            outcomes, cancelled = await _finish(task)
        except Exception as error:  # the batch never ran, or the connection broke
            outcomes = [(None, self._translate(error, "writing"))] * len(batch)
        settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for p, (result, raised) in zip(batch, outcomes, strict=True):
            failure = None if raised is None else self._translate(raised, "writing")
            if p.future is None:
                if failure is not None:
                    self._lost.append(failure)
            else:
                settled.append((p.future, result, failure))
        _settle_in_chunks(settled)
        return cancelled

    # -- the serving writer -----------------------------------------------------------------

    async def serve(self, tick_every: Callable[[], float | None],
                    tick: Callable[[], Awaitable[None]]) -> None:
        """Commit recorded writes as they arrive, until cancelled; one call at a time serves.

        `tick_every()` says how soon to wake without a write (None: only for a write);
        `tick()` runs after each wake-up (heartbeats, cancel requests, lease renewals)."""
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._serving:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._turns.append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._hand_over()
                elif turn in self._turns:
                    self._turns.remove(turn)
                raise
        else:
            self._serving = True
        try:
            await self._serve(self._wake, tick_every, tick)
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._serving = False

    async def _serve(self, wake: asyncio.Event, tick_every: Callable[[], float | None],
                     tick: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._session is not None:
                await self._next_batch()
            elif not self._queue:
                every = tick_every()
                timer = loop.call_later(every, wake.set) if every is not None else None
                try:
                    await wake.wait()
                finally:
                    if timer is not None:
                        timer.cancel()
            wake.clear()
            self.wakeups += 1
            if self._session is None and self._queue:
                await self._commit(until=None)
                wake.clear()
            await tick()
