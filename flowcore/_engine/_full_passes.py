"""Deferring the garbage collector's full passes while a burst of runs is let in.

A full pass scans every tracked object of the process; in a service or a test session with a
few hundred thousand objects it holds the loop 50-150 ms on a small VM, and a burst of 500
runs allocates enough to trigger one or two (API.md §17 asks for a lag under 50 ms). flowcore's
runs leave no reference cycles (their objects are freed by reference counting as each run
ends), so nothing of theirs needs a full pass; the young generations keep being collected as
usual. While a `StartGate` has a backlog, full passes are deferred by raising the collector's
third threshold, and the thresholds are put back when the last burst of the process is over
(or after `LONGEST_DEFERRAL`, whichever is first); the next full pass then runs as it would
have. Thresholds someone else changed meanwhile are left as they are.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

__all__ = ["LONGEST_DEFERRAL", "defer", "deferred", "resume"]

LONGEST_DEFERRAL = 2.0  # seconds a burst may keep full passes deferred
_NEVER = 1 << 30  # a third threshold no count of generation-1 collections reaches

_lock = threading.Lock()
_holders = 0
_saved: tuple[int, int, int] | None = None
_deadline = 0.0
_watching = False


def _expire(phase: str, info: dict[str, Any]) -> None:
    # A collector callback (young collections keep running): whatever happens to the loops
    # that deferred them (one may have closed mid-burst), full passes come back on time.
    global _saved, _holders
    if phase != "start" or _saved is None or time.monotonic() < _deadline:
        return
    if not _lock.acquire(blocking=False):  # the holder may be the thread collecting now
        return
    try:
        if _saved is not None:
            _restore(_saved)
            _saved = None
            _holders = 0
    finally:
        _lock.release()


def _restore(saved: tuple[int, int, int]) -> None:
    first, second, _ = saved
    if gc.get_threshold() == (first, second, _NEVER):
        gc.set_threshold(*saved)


def defer() -> None:
    """A burst begins: defer full passes until every burst has called `resume()`."""
    global _holders, _saved, _deadline, _watching
    with _lock:
        _holders += 1
        if _holders > 1:
            return
        _deadline = time.monotonic() + LONGEST_DEFERRAL
        if not _watching:
            _watching = True
            gc.callbacks.append(_expire)
        first, second, third = gc.get_threshold()
        if third == _NEVER or first == 0:  # already deferred by someone, or collection is off
            _saved = None
            return
        _saved = (first, second, third)
        gc.set_threshold(first, second, _NEVER)


def resume() -> None:
    """A burst is over: when it was the last, put the thresholds back (if still ours)."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders or _saved is None:
            return
        _restore(_saved)
        _saved = None


def deferred() -> bool:
    """Whether full passes are deferred by flowcore now."""
    with _lock:
        return _saved is not None
