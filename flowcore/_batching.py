"""Coalescing concurrent calls into batches, with no background task.

Callers queue their item; one of them (whoever finds no batch in flight) runs the batch
function on everything queued, again and again until the queue is empty, and hands each caller
its own outcome. A batch runner that is cancelled puts its unanswered items back, and the next
waiting caller takes over. The SQLite store's cache lookups and the Dask operator's result
fetches use it (the SQLite group commit has the same shape, with write-specific rules).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["Coalescer"]

K = TypeVar("K")
V = TypeVar("V")

# For each item, in order: its value, or the exception that item alone raised.
BatchFunction = Callable[[list[K]], Awaitable[list[Any]]]


class Coalescer(Generic[K, V]):
    """`await coalescer(item)` -> that item's result, computed in a batch with its peers."""

    def __init__(self, run_batch: BatchFunction[K]) -> None:
        self._run_batch = run_batch
        self._queue: list[tuple[K, asyncio.Future[V]]] = []
        self._running: asyncio.Future[None] | None = None

    async def __call__(self, item: K) -> V:
        mine: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        entry = (item, mine)
        self._queue.append(entry)
        try:
            while not mine.done():
                if self._running is None:
                    await self._drain()
                else:
                    waiting: list[asyncio.Future[Any]] = [mine, self._running]
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if entry in self._queue:
                self._queue.remove(entry)
            raise
        return mine.result()

    async def _drain(self) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running = done
        batch: list[tuple[K, asyncio.Future[V]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    outcomes = await self._run_batch([item for item, _ in batch])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the whole batch failed: every caller gets it
                    outcomes = [exc] * len(batch)
                for (_, waiter), outcome in zip(batch, outcomes, strict=True):
                    if waiter.done():
                        continue
                    if isinstance(outcome, BaseException):
                        waiter.set_exception(outcome)
                    else:
                        waiter.set_result(outcome)
                batch = []
        finally:
            # Cancelled mid-batch: what was taken goes back for the next caller to run.
            self._queue[:0] = [e for e in batch if not e[1].done()]
            self._running = None
            done.set_result(None)
