"""Helpers for testing pipelines: a fake clock so retry delays never sleep for real."""

from __future__ import annotations

import asyncio

__all__ = ["FakeClock"]


class FakeClock:
    """A clock whose `sleep` records the delay, advances virtual time and returns at once.

    Pass it with `pipeline.with_options(clock=FakeClock())`; `.sleeps` lists every delay.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        # Yield once, like a real sleep would, so other tasks get a turn.
        await asyncio.sleep(0)

    def monotonic(self) -> float:
        return self.now
