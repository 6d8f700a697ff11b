"""`StartGate`: how fast the runs of a burst of `submit()` calls are let into a loop.

Every run of a burst is ready at the same moment, and an event loop runs everything ready in
one turn: 500 runs compiling and starting their first steps together would hold the loop for
a good part of a second (API.md §17 asks for a lag under 50 ms). The gate lets the waiting
runs in a few per turn, first come first served, within two limits that adapt the way TCP's
do: an allowance per turn, doubled after a short turn and halved after a long one (and never
more than the planning budget fits), and a window, the most runs let in and not yet ended.
When the window is full, a timer probes the loop: on time, the runs in flight mostly wait and
the window grows; late, it halves. Runs that mostly wait (sleeps, I/O) are so let in nearly
as fast as they come; a burst of busy runs no faster than the loop gets through them, which
keeps every turn short and the number of runs alive at once small. While a burst lasts, the
collector's full passes are deferred (`_full_passes`).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque

import flowcore._engine._full_passes as _full_passes

__all__ = ["StartGate"]

# A turn longer than this halves the allowance; one shorter than SHORT_TURN doubles it.
LONG_TURN = 0.006
SHORT_TURN = 0.003
# What compiling and planning the runs let in may cost in one turn, and the most runs one
# turn lets in whatever the turns are like.
PLAN_BUDGET = 0.001
MOST_PER_TURN = 16
BURST = 8  # this many submit() calls in one turn are a burst
FIRST_WINDOW = 32
LARGEST_WINDOW = 1 << 16

_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StartGate] = (
    weakref.WeakKeyDictionary()
)


class StartGate:
    """The gate of one event loop (see the module's docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: deque[asyncio.Future[bool]] = deque()
        self._let_in = 0  # runs let in during the current turn
        self._allowance = 8
        self._window = FIRST_WINDOW
        self._in_flight = 0  # runs let in that have not ended
        self._plan_cost = 0.0003  # moving average of one run's compile and plan, seconds
        self._scheduled = False
        self._probing = False
        self._last_turn: float | None = None  # when the previous turn's callback ran
        # A burst: runs wait at the gate, and full collector passes are deferred until the
        # runs let in have ended (see _full_passes).
        self._burst: asyncio.TimerHandle | None = None
        self._submitted = 0  # submit() calls during the current turn

    @classmethod
    def of_running_loop(cls) -> StartGate:
        loop = asyncio.get_running_loop()
        gate = _gates.get(loop)
        if gate is None:
            gate = _gates[loop] = cls(loop)
        return gate

    def enter(self) -> asyncio.Future[bool] | None:
        """None: go now. Else a future that becomes True when the run is let in (or False,
        set by whoever stops it while it waits)."""
        self._every_turn()
        if not self._queue and self._let_in < self._per_turn():
            self._let_in += 1
            self._in_flight += 1
            return None
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._queue.append(waiter)
        self._burst_begins()
        return waiter

    def submitted(self) -> None:
        """`submit()` was called: many in one turn are a burst from the first (the submits
        themselves allocate enough to set off a full collector pass)."""
        self._submitted += 1
        if self._submitted == BURST:
            self._burst_begins()
        self._every_turn()

    def _burst_begins(self) -> None:
        if self._burst is None:
            _full_passes.defer()
            self._burst = self._loop.call_later(_full_passes.LONGEST_DEFERRAL, self._burst_over)

    def planned(self, seconds: float) -> None:
        """A run let in took `seconds` to compile and plan."""
        self._plan_cost += (seconds - self._plan_cost) / 8

    def ended(self) -> None:
        """A run let in has ended (its record is final)."""
        self._in_flight -= 1
        if self._queue:
            self._every_turn()
        elif self._in_flight <= 0 and self._burst is not None:
            self._burst_over()

    def _burst_over(self) -> None:
        if self._burst is not None:
            self._burst.cancel()
            self._burst = None
            _full_passes.resume()

    def _per_turn(self) -> int:
        fits = int(PLAN_BUDGET / max(self._plan_cost, 1e-6))
        room = self._window - self._in_flight
        return max(0 if self._in_flight else 1, min(self._allowance, fits, room))

    def _every_turn(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        # Runs once per turn of the loop while runs are let in: the time since it last ran
        # is how long the last turn was.
        self._scheduled = False
        self._submitted = 0
        now = time.perf_counter()
        if self._last_turn is not None:
            took = now - self._last_turn
            if took > LONG_TURN:
                self._slower()
            elif took < SHORT_TURN:
                self._faster()
        self._let_in = 0
        per_turn = self._per_turn()
        while self._let_in < per_turn and self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(True)
                self._let_in += 1
                self._in_flight += 1
        if self._let_in:
            self._last_turn = now
            self._every_turn()
            return
        self._last_turn = None
        if not self._queue and self._in_flight <= 0:
            self._burst_over()
        if self._queue and not self._probing:
            # The window is full. A run ending wakes the gate (ended()); so does a timer that
            # finds the loop idle (runs that mostly wait must not hold the others back).
            self._probing = True
            self._loop.call_later(LONG_TURN, self._probe, now + LONG_TURN)

    def _probe(self, due: float) -> None:
        # The window is full: a timer that fires on time says the loop has room for more
        # runs (those in flight mostly wait); a late one says it has too many already.
        self._probing = False
        late = time.perf_counter() - due
        if late < SHORT_TURN:
            self._faster(grow_window=True)
        elif late > LONG_TURN:
            self._slower()
        if self._queue:
            self._every_turn()

    def _slower(self) -> None:
        self._allowance = max(1, self._allowance // 2)
        self._window = max(FIRST_WINDOW // 4, self._window // 2)

    def _faster(self, grow_window: bool = False) -> None:
        # The allowance doubles; the window grows (by a quarter) only when a probe found the
        # loop idle with the window full (the runs in flight mostly wait): the work of runs
        # let in shows up turns later, and a window that grew on short turns meanwhile would
        # overshoot (TCP's slow start does).
        self._allowance = min(MOST_PER_TURN, self._allowance * 2)
        if grow_window:
            self._window = min(LARGEST_WINDOW, self._window + max(self._allowance, self._window // 4))
