"""The worker threads sync step bodies and sync hooks run in.

A process-wide pool of its own, not the event loop's default executor: `asyncio.run` joins the
default executor's threads when it ends, so a FAIL_FAST or cancelled run started with a plain
`pipeline()` call would block until abandoned sync bodies finished. This pool is never joined
by a loop, and it is larger than the default (min(32, cpus + 4)), because sync steps often
wait on I/O rather than compute.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["run_in_worker_thread"]

T = TypeVar("T")

_MAX_WORKERS = int(os.environ.get("FLOWCORE_MAX_THREADS", "64"))
_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix="flowcore")
    return _executor


async def run_in_worker_thread(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run `func` in a flowcore worker thread with the caller's context variables (the step
    context, captured output). Cancelling the await abandons the thread's result."""
    ctx = contextvars.copy_context()
    call = functools.partial(ctx.run, func, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool(), call)
