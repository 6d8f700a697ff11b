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
from dataclasses import dataclass, field

__all__ = ["LiveRun", "LiveRuns"]


@dataclass(eq=False)
class LiveRun:
    """One run in progress: its loop, how to stop it, and a future done when it is recorded."""

    run_id: str
    loop: asyncio.AbstractEventLoop
    stop: Callable[[bool], None]
    done: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)

    def request_stop(self, drain: bool = False) -> None:
        """Ask the run to stop (from any thread); a run already ending ignores it."""
        if self.done.done():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.stop(drain)
        else:
            try:
                self.loop.call_soon_threadsafe(self.stop, drain)
            except RuntimeError:  # its loop has closed: the run is over
                pass


class LiveRuns:
    """The live runs of one stack in this process."""

    def __init__(self) -> None:
        self._runs: dict[str, LiveRun] = {}
        self._lock = threading.Lock()

    def add(self, run_id: str, stop: Callable[[bool], None]) -> LiveRun:
        live = LiveRun(run_id, asyncio.get_running_loop(), stop)
        with self._lock:
            self._runs[run_id] = live
        return live

    def finish(self, live: LiveRun) -> None:
        with self._lock:
            self._runs.pop(live.run_id, None)
        if not live.done.done():
            live.done.set_result(None)

    def get(self, run_id: str) -> LiveRun | None:
        with self._lock:
            return self._runs.get(run_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)

    async def stop_all(self, drain: bool = False) -> None:
        """Ask every live run to stop and wait until each one's record is final."""
        with self._lock:
            runs = list(self._runs.values())
        for live in runs:
            live.request_stop(drain)
        for live in runs:
            await asyncio.wrap_future(live.done)
