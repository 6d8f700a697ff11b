"""Pools: limits shared by every run on a stack (API.md §16).

Within one process a pool is a first-in, first-out set of slots: a waiter is handed a freed
slot directly, so no later arrival can overtake it, and nothing holds a lock across an
await. Across processes sharing the metadata store, a slot is also a lease in the store that
lapses when its holder stops heartbeating (a killed process frees its slots within ~10 s);
while the store's leases are all taken, a waiter asks again every half second, since one
process cannot wake another through SQLite.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Mapping

from flowcore.exceptions import ConfigError
from flowcore.stores._base import MetadataStore

__all__ = ["Pools"]

_LEASE_RETRY = 0.5


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Slots:
    """FIFO slots of one pool in this process, usable from several event loops."""

    def __init__(self, limit: int) -> None:
        self.free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._lock = threading.Lock()

    async def acquire(self) -> None:
        with self._lock:
            if self.free > 0 and not self._waiters:
                self.free -= 1
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        try:
            await waiter  # release() hands its slot to us
        except asyncio.CancelledError:
            with self._lock:
                granted = waiter.done() and not waiter.cancelled()
                if not granted:
                    self._waiters.remove(waiter)
            if granted:
                self.release()  # handed over as we were cancelled: pass it on
            raise

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                if waiter.done():
                    continue
                loop = waiter.get_loop()
                try:
                    running = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                if loop is running:
                    waiter.set_result(None)
                    return
                try:
                    loop.call_soon_threadsafe(_wake, waiter)
                    return
                except RuntimeError:  # that waiter's loop has closed
                    continue
            self.free += 1


class Pools:
    """The pools of a stack: name -> how many bodies holding it may run at once."""

    def __init__(self, limits: Mapping[str, int] | None = None) -> None:
        self.limits: dict[str, int] = {}
        for name, limit in (limits or {}).items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"pool names must be non-empty strings, not {name!r}")
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ConfigError(f"pool '{name}': the limit must be a whole number >= 1, "
                                  f"not {limit!r}")
            self.limits[name] = limit
        self._slots = {name: _Slots(limit) for name, limit in self.limits.items()}
        # Store leases whose timed-out body returned later: given back at the next occasion.
        self._late: list[tuple[str, str]] = []

    def __contains__(self, name: object) -> bool:
        return name in self.limits

    def __repr__(self) -> str:
        return f"<Pools {self.limits}>"

    def merged(self, limits: Mapping[str, int]) -> Pools:
        """A new set of pools: these limits added to (or replacing) the current ones."""
        return Pools({**self.limits, **limits})

    async def acquire(self, name: str, holder: str, store: MetadataStore) -> None:
        """Wait for a slot of pool `name` (FIFO in this process, then a lease in the store)."""
        await self._give_back_late(store)
        slots = self._slots[name]
        await slots.acquire()
        try:
            # Across processes there is no event to wait on (SQLite): ask again.
            while not await store.acquire_slot(name, self.limits[name], holder):  # noqa: ASYNC110
                await asyncio.sleep(_LEASE_RETRY)
        except BaseException:
            slots.release()
            raise

    def release_when_done(self, name: str, holder: str, body: asyncio.Future[None]) -> None:
        """Keep the slot until `body` (a sync body's thread) returns, then give it back."""

        def done(_: asyncio.Future[None]) -> None:
            self._late.append((name, holder))
            self._slots[name].release()

        body.add_done_callback(done)

    async def _give_back_late(self, store: MetadataStore) -> None:
        while self._late:
            name, holder = self._late.pop()
            await store.release_slot(name, holder)

    async def release(self, name: str, holder: str, store: MetadataStore) -> None:
        """Give the slot back (the store's lease first, then the process's slot)."""
        try:
            await self._give_back_late(store)
            await store.release_slot(name, holder)
        finally:
            self._slots[name].release()
