"""The SQLite store's connection and its group commit, the part that runs in the connection's
thread: a batch of queued writes applied in one transaction, and their callers' futures
settled with one wake-up of the event loop."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from flowcore.exceptions import _WriteFailed
from flowcore.stores._sqlite_steps import StepWrite, apply_step_writes

__all__ = ["Connection", "Pending", "commit_batch", "mark_retrieved", "settle"]

T = TypeVar("T")


class Connection:
    """The store's aiosqlite connection, running whole functions in its thread.

    aiosqlite runs every call in the connection's own thread. We hand it whole synchronous
    functions (a group commit, a multi-query read) through `Connection._execute`, so each
    transaction begins and ends inside one call: a cancelled caller can never leave one open
    (holding the write lock other processes wait for), and a batch costs one thread hop.
    `_execute` and `_conn` are private to aiosqlite but have been stable since its first
    releases; this class is the only place that touches them.
    """

    def __init__(self, aio: aiosqlite.Connection) -> None:
        self._aio = aio

    @classmethod
    async def connect(cls, path: Path, busy_timeout: float) -> Connection:
        aio = aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
        # A daemon thread: a store the application forgot to close must not keep the
        # interpreter from exiting (every write has been committed before it returned).
        aio._thread.daemon = True
        await aio
        return cls(aio)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self.submit(fn)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `fn` for the connection's thread at once; its result comes to a future of
        the running loop (any loop: the thread answers each call on its caller's loop).
        Calls run one at a time, in the order they were submitted."""
        aio = self._aio
        if aio._connection is None or not aio._running:
            # What sqlite3 raises for a closed connection (aiosqlite raises ValueError), so the
            # store's one error translation covers it.
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        aio._tx.put_nowait((future, lambda: fn(aio._conn)))
        return future

    async def close(self) -> None:
        await self._aio.close()


@dataclass(eq=False)
class Pending:
    """One write waiting for a group commit."""

    write: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any] | None  # None: queued by record_step_run, nobody awaits it
    submitted: bool = False


def commit_batch(
    db: sqlite3.Connection,
    batch: list[Pending],
    translate: Callable[[BaseException], BaseException],
    lost: Callable[[BaseException], None],
) -> None:
    """Apply every queued write in one transaction.

    The fast path runs the batch without savepoints; if any write fails, the transaction is
    rolled back and the batch is replayed with one savepoint per write, so a failing write is
    rolled back alone and the others commit.
    """
    outcomes: list[tuple[Any, BaseException | None]]
    try:
        try:
            outcomes = _apply(db, batch, isolated=False)
        except _WriteFailed:
            outcomes = _apply(db, batch, isolated=True)
    except sqlite3.Error as exc:
        outcomes = [(None, exc)] * len(batch)
    settled = [(pending.future, result, None if error is None else translate(error))
               for pending, (result, error) in zip(batch, outcomes, strict=True)]
    # One wake-up of the event loop per batch, not one per write.
    _settle_all_threadsafe(settled, lost)


def _apply(
    db: sqlite3.Connection, batch: list[Pending], *, isolated: bool,
) -> list[tuple[Any, BaseException | None]]:
    outcomes: list[tuple[Any, BaseException | None]] = []
    # IMMEDIATE takes the write lock up front, so the busy timeout applies; a deferred
    # transaction that upgrades later can fail at once with "database is locked".
    db.execute("BEGIN IMMEDIATE")
    try:
        (_apply_isolated if isolated else _apply_grouped)(db, batch, outcomes)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outcomes


def _apply_isolated(db: sqlite3.Connection, batch: list[Pending],
                    outcomes: list[tuple[Any, BaseException | None]]) -> None:
    """Apply each write in a savepoint of its own: a failing write is rolled back alone."""
    for pending in batch:
        db.execute("SAVEPOINT flowcore_write")
        try:
            result = pending.write(db)
        except sqlite3.OperationalError:
            raise
        except Exception as exc:
            db.execute("ROLLBACK TO flowcore_write")
            outcomes.append((None, exc))
        else:
            outcomes.append((result, None))
        db.execute("RELEASE flowcore_write")


def _apply_grouped(db: sqlite3.Connection, batch: list[Pending],
                   outcomes: list[tuple[Any, BaseException | None]]) -> None:
    """Apply the batch with no savepoints, step writes that follow one another together
    (see _sqlite_steps); any failure but a locked database fails the whole batch."""
    index = 0
    while index < len(batch):
        write = batch[index].write
        try:
            if type(write) is StepWrite:
                end = index + 1
                while end < len(batch) and type(batch[end].write) is StepWrite:
                    end += 1
                apply_step_writes(db, [cast(StepWrite, p.write) for p in batch[index:end]])
                outcomes.extend([(None, None)] * (end - index))
                index = end
                continue
            outcomes.append((write(db), None))
        except sqlite3.OperationalError:
            raise
        except Exception as exc:
            raise _WriteFailed from exc
        index += 1


_Settled = list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]]


# Awaited writes settled per turn of the event loop: a batch of hundreds of writes would
# otherwise resume hundreds of tasks in one loop iteration (see _sqlite_writer.WAKE_CHUNK).
_SETTLE_CHUNK = 32


def _settle_all(settled: _Settled, lost: Callable[[BaseException], None], start: int = 0) -> None:
    woken = 0
    index = start
    while index < len(settled) and woken < _SETTLE_CHUNK:
        future, result, error = settled[index]
        index += 1
        if future is not None:
            settle(future, result, error)
            woken += 1
        elif error is not None:
            lost(error)
    if index < len(settled):
        asyncio.get_running_loop().call_soon(_settle_all, settled, lost, index)


def _settle_all_threadsafe(settled: _Settled, lost: Callable[[BaseException], None]) -> None:
    loop = next((f.get_loop() for f, _, _ in settled if f is not None), None)
    if loop is None:
        errors = [e for _, _, e in settled if e is not None]
        for error in errors:
            lost(error)  # thread-safe: it only appends to a list
        return
    try:
        loop.call_soon_threadsafe(_settle_all, settled, lost)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def mark_retrieved(future: asyncio.Future[Any]) -> None:
    # A cancelled caller never reads its write's error; read it so asyncio does not log
    # "exception was never retrieved".
    if not future.cancelled():
        future.exception()
