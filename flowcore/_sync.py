"""Running a prepared run from synchronous code: blocking, or on a thread of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from flowcore._handles import RunHandle
from flowcore._models import PipelineRun
from flowcore._prepare import PreparedRun
from flowcore._runner import execute, execute_in_background
from flowcore.stack import Stack

__all__ = ["run_in_thread", "run_sync", "run_sync_with_stack"]

T = TypeVar("T")


def run_sync_with_stack(stack: Stack, make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a fresh event loop, closing the stack's store for that loop after."""

    async def main() -> T:
        try:
            return await make()
        finally:
            await asyncio.shield(stack.close())

    return asyncio.run(main())


def run_sync(prep: PreparedRun) -> PipelineRun:
    """Run to the end on a fresh event loop in this thread."""
    return run_sync_with_stack(prep.stack, lambda: execute(prep))


def run_in_thread(prep: PreparedRun) -> RunHandle:
    """Start the run on a new thread with its own loop; the handle's `.result()` blocks."""
    future: concurrent.futures.Future[PipelineRun] = concurrent.futures.Future()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> PipelineRun:
        holder["loop"] = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        task.set_name(f"flowcore:run:{prep.run.name}")
        started.set()
        try:
            return await execute_in_background(prep)
        finally:
            await asyncio.shield(prep.stack.close())

    def target() -> None:
        try:
            result = asyncio.run(main())
        except BaseException as exc:
            started.set()
            future.set_exception(exc)
        else:
            future.set_result(result)

    thread = threading.Thread(target=target, name=f"flowcore:{prep.run.name}", daemon=False)
    thread.start()
    started.wait()
    return RunHandle(prep, future=future, loop=holder.get("loop"))
