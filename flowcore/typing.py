"""Public protocols: what flowcore needs from a clock (retry sleeps go through one)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Clock"]


@runtime_checkable
class Clock(Protocol):
    """Time as the runner sees it; tests inject a fake one so retries never sleep for real."""

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` (cancellable)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a monotonic clock."""
        ...
