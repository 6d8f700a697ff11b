"""Finishing a piece of work even while the caller is being cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio

__all__ = ["finish_regardless"]

T = TypeVar("T")


async def finish_regardless(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end even while the caller is being cancelled.

    An anyio cancel scope keeps cancelling its task until the scope exits, and plain asyncio
    may cancel more than once; both would otherwise abandon the write half-way. A
    cancellation that arrived meanwhile is raised once the work is done.
    """
    task = asyncio.ensure_future(work)
    interrupted = False
    with anyio.CancelScope(shield=True):
        while True:
            try:
                result = await asyncio.shield(task)
                break
            except asyncio.CancelledError:
                if task.done():
                    raise
                interrupted = True
    if interrupted:
        raise asyncio.CancelledError
    return result
