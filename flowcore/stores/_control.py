"""Run control a metadata store keeps in its process (API.md §15-16): who to tell when a
run is asked to stop, and the pool slots held here.

A store may be shared by several event loops (the in-memory one is), so both are guarded by a
lock, and a watcher is called on the loop that registered it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

__all__ = ["CancelWatchers", "Leases"]

Stop = Callable[[bool], None]


def _call_on(loop: asyncio.AbstractEventLoop | None, stop: Stop, drain: bool) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is None or loop is running:
        stop(drain)
        return
    try:
        loop.call_soon_threadsafe(stop, drain)
    except RuntimeError:  # that loop has closed: its run is over
        pass


class CancelWatchers:
    """The runs of this process that listen for cancel requests, by run id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stops: dict[str, tuple[asyncio.AbstractEventLoop | None, Stop]] = {}
        # Requests for a run not watched yet (asked between its record and its watch): handed
        # over when it is.
        self._early: dict[str, bool] = {}

    def add(self, run_id: str, stop: Stop) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._stops[run_id] = (loop, stop)
            early = self._early.pop(run_id, None)
        if early is not None:
            _call_on(loop, stop, early)

    def remove(self, run_id: str) -> None:
        with self._lock:
            self._stops.pop(run_id, None)
            self._early.pop(run_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._stops)

    def __bool__(self) -> bool:
        return bool(self._stops)

    def deliver(self, run_id: str, drain: bool, *, keep: bool = False) -> bool:
        """Tell the run's watcher to stop (on its loop); False if the run is not watched
        here. With `keep`, an unwatched run gets the request when it starts watching."""
        with self._lock:
            entry = self._stops.get(run_id)
            if entry is None:
                if keep:
                    # A stop without drain wins over an earlier drain.
                    self._early[run_id] = self._early.get(run_id, True) and drain
                return False
        _call_on(entry[0], entry[1], drain)
        return True


class Leases:
    """Pool slots held in this process: pool -> holders."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, set[str]] = {}

    def take(self, pool: str, limit: int, holder: str) -> bool:
        with self._lock:
            holders = self._held.setdefault(pool, set())
            if holder in holders:
                return True
            if len(holders) >= limit:
                return False
            holders.add(holder)
            return True

    def give_back(self, pool: str, holder: str) -> None:
        with self._lock:
            holders = self._held.get(pool)
            if holders is not None:
                holders.discard(holder)
                if not holders:
                    del self._held[pool]

    def held(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(pool, holder) for pool, holders in self._held.items() for holder in holders]

    def __bool__(self) -> bool:
        return bool(self._held)
