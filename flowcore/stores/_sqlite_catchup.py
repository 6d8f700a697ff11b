"""Read-your-writes across loops: a read waits for the writes this process queued on the
same database file before it, on whichever loop they were queued.

The engine starts a step's dependents while the step's row is still queued (the writes are
committed in order, so a dependent's row never lands before it). A client of this process
reading meanwhile must still see that row: on the queue's own loop the read simply waits for
the queue; from another loop (a sync `Client`, which runs on a loop of its own, maybe while
the run's loop is blocked by that very call) it hands the queued writes to the queue's
connection thread itself, behind any batch in flight, and waits for their commit.
"""

from __future__ import annotations

import asyncio
import contextvars
import sqlite3

from flowcore.stores._sqlite_writer import QUEUES, WriteQueue

__all__ = ["caught_up", "reads_wait_for_own_writes", "steal"]

# False on a lookup thread whose caller's loop is blocked waiting for it (a sync submit()
# resolving resume_from from inside a running loop): handing over, or waiting for, writes
# queued on that blocked loop has been seen to deadlock; its reads may be a little behind.
reads_wait_for_own_writes: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "flowcore_reads_wait_for_own_writes", default=True)


def steal(queue: WriteQueue) -> tuple[asyncio.Future[None], int] | None:
    """For a reader on another loop: hand `queue`'s queued writes to its connection's thread
    now (the queue's own loop may be blocked, by a sync Client call on its thread, say),
    behind any batch in flight; the returned future (of the reader's loop) resolves once
    they are committed. None if the queue's connection is closed."""
    db = queue._connection()
    if db is None:
        return None
    with queue._lock:
        batch = [p for p in queue._queue if p.future is None or not p.future.cancelled()]
        queue._queue = []
        ticket = queue._enqueued
        for pending in batch:
            pending.submitted = True
        queue._queued_steps.clear()
        try:
            # An empty batch still waits for the batches in flight (the thread is FIFO).
            future = db.submit(queue._committer(batch) if batch else _nothing)
        except sqlite3.Error:
            return None
        queue._steals += 1
    return future, ticket


def _nothing(db: sqlite3.Connection) -> None:
    return None


def _stolen_done(queue: WriteQueue, ticket: int) -> None:
    with queue._lock:
        queue._steals -= 1
    queue._batch_done(ticket)


async def caught_up(path: str) -> None:
    """Return once the writes this process queued on `path` before the call are committed.

    The engine starts a step's dependents without waiting for its row's commit; this is what
    keeps a read through any client of this process (one awaited on the run's loop, or a sync
    Client, on a loop of its own) from missing the upstream row.
    """
    if not reads_wait_for_own_writes.get():
        return
    here = asyncio.get_running_loop()
    for queue in list(QUEUES.get(path, ())):
        if not queue.pending:
            continue
        loop = queue._loop
        if loop is None or loop is here:
            await queue.settled()
            continue
        taken = steal(queue)
        if taken is None:
            continue
        future, ticket = taken
        try:
            await future
        finally:
            try:
                loop.call_soon_threadsafe(_stolen_done, queue, ticket)
            except RuntimeError:  # that loop is closed: nobody waits on the queue any more
                with queue._lock:
                    queue._steals -= 1
