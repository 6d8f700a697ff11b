"""Time: timezone-aware UTC timestamps and the real clock retries sleep on."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

__all__ = ["SystemClock", "utcnow"]

_now = datetime.now


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return _now(UTC)


class SystemClock:
    """Real time: `asyncio.sleep` and the running loop's monotonic time."""

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()
