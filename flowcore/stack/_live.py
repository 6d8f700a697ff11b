"""The runs a process has live on a stack, so that closing the stack can stop them.

The engine registers each run when it starts (with a thread-safe way to ask it to stop) and
marks it done when its record is final; `Stack.aclose()` asks every live run to stop and
waits until each is recorded. Runs may live on other event loops (a non-synchronous call
runs on a thread of its own), hence the thread-safe calls and futures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LiveRun", "LiveRuns"]


@dataclass(eq=False)
class LiveRun:
    """One run in progress: its loop, how to stop it, and a future done when it is recorded."""

    run_id: str
    loop: asyncio.AbstractEventLoop
    stop: Callable[[bool], None]
    # Made only when someone waits for the run's end (closing the stack): a future costs a
    # lock and a condition, which every run would pay otherwise.
    waiter: concurrent.futures.Future[None] | None = None
    finished: bool = False
    # The stop asked for so far (None: none; True: drain), remembered so that a stopper
    # attached later (a submitted run gets its scheduler after its plan) hears it too.
    requested: bool | None = None

    def request_stop(self, drain: bool = False) -> None:
        """Ask the run to stop (from any thread); a run already ending ignores it."""
        if self.finished:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._deliver(drain)
        else:
            try:
                self.loop.call_soon_threadsafe(self._deliver, drain)
            except RuntimeError:  # its loop has closed: the run is over
                pass

    def _deliver(self, drain: bool) -> None:
        # On the run's loop; a stop without drain beats one with it.
        self.requested = drain if self.requested is None else (self.requested and drain)
        self.stop(drain)


class LiveRuns:
    """The live runs of one stack in this process."""

    def __init__(self) -> None:
        self._runs: dict[str, LiveRun] = {}
        self._lock = threading.Lock()

    def add(self, run_id: str, stop: Callable[[bool], None]) -> LiveRun:
        """Register a run (on its loop), or give one already registered a new stopper, which
        at once hears any stop asked for before it."""
        with self._lock:
            live = self._runs.get(run_id)
            if live is None:
                live = self._runs[run_id] = LiveRun(run_id, asyncio.get_running_loop(), stop)
                return live
            live.stop = stop
        if live.requested is not None:
            stop(live.requested)
        return live

    def finish(self, live: LiveRun) -> None:
        with self._lock:
            self._runs.pop(live.run_id, None)
            live.finished = True
            waiter = live.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get(self, run_id: str) -> LiveRun | None:
        with self._lock:
            return self._runs.get(run_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)

    async def finished(self, live: LiveRun) -> None:
        """Wait (from any loop) until the run's record is final."""
        with self._lock:
            if live.finished:
                return
            if live.waiter is None:
                live.waiter = concurrent.futures.Future()
            waiter = live.waiter
        await asyncio.wrap_future(waiter)

    async def stop_all(self, drain: bool = False) -> None:
        """Ask every live run to stop and wait until each one's record is final."""
        with self._lock:
            runs = list(self._runs.values())
            waiters = []
            for live in runs:
                if live.waiter is None:
                    live.waiter = concurrent.futures.Future()
                waiters.append(live.waiter)
        for live in runs:
            if live.loop.is_closed():
                # Its loop ended without it (a task never run when asyncio.run returned):
                # nothing is left to stop or to wait for.
                self.finish(live)
            else:
                live.request_stop(drain)
        for waiter in waiters:
            await asyncio.wrap_future(waiter)
