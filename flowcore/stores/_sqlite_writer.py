"""The SQLite store's write queue, on the event loop: group commit, the one serving writer,
and flushes that wait only for what was queued before them.

Writes queue up while a batch is being committed and go together in the next one. Every
queued write takes a ticket (`enqueued`); a batch taken at ticket N commits every write up
to N. So a caller waits for its own ticket, not for a queue that other runs keep filling:
under load, one flush costs about one batch, never everyone's writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar, cast

from flowcore.stores._sqlite_commit import Connection, Pending, commit_batch, mark_retrieved, settle
from flowcore.stores._sqlite_errors import StoreErrors

__all__ = ["QUEUES", "WriteQueue", "wake_in_chunks"]

# Every write queue of this process, by database file: a read waits for the writes this
# process queued on the same file before it (read-your-writes), whichever store object or
# event loop queued them (a sync step body's Client has its own loop and store).
QUEUES: dict[str, weakref.WeakSet[WriteQueue]] = {}

# Waiters woken per turn of the event loop when a batch ends. Hundreds of runs waiting on one
# group commit would otherwise all resume in the same loop iteration and, at a few hundred
# microseconds each, hold the loop for 100 ms (measured with 500 concurrent runs); in chunks,
# timers and I/O get a turn between them and the total work is the same.
WAKE_CHUNK = 8


def wake_in_chunks(waiters: deque[asyncio.Future[None]]) -> None:
    """Resolve `waiters` in order, WAKE_CHUNK of them now and the rest in later iterations."""
    for _ in range(min(WAKE_CHUNK, len(waiters))):
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
    if waiters:
        waiters[0].get_loop().call_soon(wake_in_chunks, waiters)

T = TypeVar("T")


class WriteQueue:
    """Queued writes of one store and whoever commits them.

    Args:
        errors: translates sqlite3 errors into StoreErrors naming the file.
        connection: the store's open connection (None once closed).
    """

    def __init__(self, errors: StoreErrors, connection: Callable[[], Connection | None]) -> None:
        self._errors = errors
        self._connection = connection
        self._queue: list[Pending] = []
        # Step-run writes queued and not yet taken by a commit, by step run id.
        self._queued_steps: dict[str, Pending] = {}
        self._session: asyncio.Future[None] | None = None  # set while a committer runs
        # Callers waiting for the batch in flight to end (see wake_in_chunks).
        self._batch_waiters: deque[asyncio.Future[None]] = deque()
        self._enqueued = 0  # tickets handed out
        self._committed = 0  # every write up to this ticket is committed (or settled failed)
        self._lost: list[BaseException] = []  # failed writes nobody awaited
        self._wake: asyncio.Event | None = None  # set when record() queued a write
        # One serve() call serves at a time (every run starts one on this per-loop store);
        # the others wait their turn here, first come first served.
        self._serving = False
        self._turns: deque[asyncio.Future[None]] = deque()
        # Measured, not guessed: how often the serving writer resumed; how many batches.
        self.wakeups = 0
        self.commits = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop writes are queued on
        # Taking queued writes for a commit happens on our loop or, for a reader on another
        # loop, on its thread (see steal): the queue's contents change under this lock only.
        self._lock = threading.Lock()
        self._steals = 0  # batches taken by readers of other loops, not yet committed

    def register(self, path: str) -> None:
        """List this queue among the queues of `path` (see caught_up)."""
        QUEUES.setdefault(path, weakref.WeakSet()).add(self)

    @property
    def pending(self) -> bool:
        """Whether some queued write is not yet committed."""
        return self._committed < self._enqueued

    async def settled(self) -> None:
        """Wait until the writes queued before this call are committed (errors stay queued
        for the next flush)."""
        await self._until(self._enqueued)

    # -- queueing ---------------------------------------------------------------------------

    async def write(self, write: Callable[[sqlite3.Connection], T], step_key: str = "") -> T:
        """Queue a write and wait until it is committed; return its result.

        A step-run write (`step_key` set) replaces the same step run's queued, unawaited write
        that no commit has taken yet: it carries the newer state, so a step that starts and
        ends between two commits costs one row write, not two.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(mark_retrieved)
        with self._lock:
            queued = self._queued_steps.get(step_key) if step_key else None
            if queued is not None and queued.future is None and not queued.submitted:
                queued.write = write
                queued.future = future
                pending = queued
            else:
                pending = Pending(write, future)
                self._queue.append(pending)
            self._enqueued += 1
        try:
            await self._until(self._enqueued)
            # Our write is in a committed batch, or in one whose thread settles it now.
            return cast(T, await future)
        except asyncio.CancelledError:
            with self._lock:
                if not pending.submitted and pending in self._queue:
                    self._queue.remove(pending)  # it never reached the database
                    if step_key and self._queued_steps.get(step_key) is pending:
                        del self._queued_steps[step_key]
            raise

    def record(self, step_key: str, write: Callable[[sqlite3.Connection], None]) -> None:
        """Queue a step-run write nobody awaits (the serving writer or a flush commits it)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        with self._lock:
            self._enqueued += 1
            queued = self._queued_steps.get(step_key)
            if queued is not None and not queued.submitted:
                queued.write = write  # newer state of the same step run (see write)
                return
            pending = Pending(write, None)
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
        while self._queue or self._session is not None or self._steals:
            if self._session is None and self._queue:
                await self._commit(until=None)
            else:
                await self._next_batch()

    # -- committing -------------------------------------------------------------------------

    async def _until(self, ticket: int) -> None:
        """Return once every write up to `ticket` is committed: commit a batch ourselves when
        nobody is committing, else wait for the batch in flight and look again."""
        while self._committed < ticket:
            if self._session is None:
                if not self._queue:
                    if self._steals:  # taken by a reader of another loop: committed soon
                        await self._next_batch()
                        continue
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
        """Commit batches until ticket `until` is committed (None: until the queue is empty).

        Writers queued behind a caller that stops early wake at its batch's end and commit
        the next batch themselves; the serving writer does the same for recorded writes.
        """
        session: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._session = session
        cancelled: asyncio.CancelledError | None = None
        try:
            while self._queue and (until is None or self._committed < until):
                batch, ticket, submitted = self._take()
                if batch:
                    cancelled = await self._commit_batch(batch, submitted) or cancelled
                    self.commits += 1
                self._batch_done(ticket)
        finally:
            self._session = None
            session.set_result(None)
            self._batch_done(self._committed)  # wake waiters: someone must take the next batch
        if cancelled is not None:
            try:
                raise cancelled
            finally:
                # Not kept in this frame, which its traceback holds: no reference cycle
                # (one per run otherwise, left to the garbage collector).
                cancelled = None

    def _take(self) -> tuple[list[Pending], int, asyncio.Future[None] | BaseException]:
        """Take every queued write and hand them to the connection's thread as one batch:
        (the batch, the ticket it commits up to, its commit's future or why it never ran).

        Taking and handing over happen under the lock, so batches reach the connection's
        thread, which runs them one after another, in the order their writes were queued;
        also those a reader of another loop takes (see steal)."""
        db = self._connection()
        with self._lock:
            # A writer cancelled while queued has had its future cancelled: drop its write.
            batch = [p for p in self._queue if p.future is None or not p.future.cancelled()]
            self._queue = []
            ticket = self._enqueued
            for pending in batch:
                pending.submitted = True
            self._queued_steps.clear()
            if not batch:
                return batch, ticket, sqlite3.ProgrammingError("empty batch")
            try:
                if db is None:
                    raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
                return batch, ticket, db.submit(self._committer(batch))
            except sqlite3.Error as exc:
                return batch, ticket, exc

    def _committer(self, batch: list[Pending]) -> Callable[[sqlite3.Connection], None]:
        return partial(commit_batch, batch=batch, lost=self._lost.append,
                       translate=partial(self._errors.translate, operation="writing"))

    async def _commit_batch(self, batch: list[Pending],
                            submitted: asyncio.Future[None] | BaseException,
                            ) -> asyncio.CancelledError | None:
        try:
            with self._errors("writing"):
                if isinstance(submitted, BaseException):
                    raise submitted
                await submitted
        except asyncio.CancelledError as exc:
            # The thread still commits this batch and settles its futures. Keep going:
            # writers queued behind us wait on us, not on a timer.
            return exc
        except Exception as error:  # the batch never ran (e.g. the connection closed)
            for pending in batch:
                if pending.future is None:
                    self._lost.append(error)
                else:
                    settle(pending.future, None, error)
        return None

    # -- the serving writer -----------------------------------------------------------------

    async def serve(self, tick_every: Callable[[], float | None],
                    tick: Callable[[], Awaitable[None]]) -> None:
        """Commit recorded writes as they arrive, until cancelled; one call at a time serves.

        `tick_every()` says how soon the writer must wake without a write (None: only for a
        write); `tick()` runs after each wake-up (cancel requests, lease renewals).
        """
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._serving:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._turns.append(turn)
            try:
                await turn  # the serving call hands over to us when it is cancelled
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._hand_over()  # handed over as we were cancelled: pass it on
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
                turn.set_result(None)  # still serving: the next call takes over
                return
        self._serving = False

    async def _serve(self, wake: asyncio.Event, tick_every: Callable[[], float | None],
                     tick: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._session is not None:
                await self._next_batch()  # whoever commits may stop at its own ticket
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
                wake.clear()  # what woke us meanwhile is committed
            await tick()

