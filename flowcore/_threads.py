"""The worker threads sync step bodies and sync hooks run in.

A process-wide pool of its own rather than a `ThreadPoolExecutor`: `concurrent.futures` joins
its threads when the interpreter exits, and the event loop's default executor is joined when
`asyncio.run` ends, so Ctrl-C during `pipeline()` would wait for an abandoned 20 s body before
the process could exit. These threads are daemons that nothing joins: a body nobody waits for
any more is simply left to finish (or to die with the process). The pool grows on demand up
to `FLOWCORE_MAX_THREADS` (default 64, more than the default executor's min(32, cpus + 4),
because sync steps often wait on I/O rather than compute).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from flowcore.exceptions import ConfigError

__all__ = ["max_threads", "run_in_worker_thread"]

T = TypeVar("T")

_DEFAULT_MAX_THREADS = 64

_Work = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


def max_threads() -> int:
    """`FLOWCORE_MAX_THREADS`, read when the pool is first needed (never at import).

    Raises:
        ConfigError: the variable is not a whole number of at least 1.
    """
    raw = os.environ.get("FLOWCORE_MAX_THREADS")
    if raw is None or not raw.strip():
        return _DEFAULT_MAX_THREADS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"environment variable FLOWCORE_MAX_THREADS={raw!r} must be a whole number >= 1 "
            f"(the most worker threads sync steps run in; default {_DEFAULT_MAX_THREADS})"
        )
    return value


class _DaemonPool:
    """Daemon worker threads fed from one queue; a thread is added only when none is idle.

    No lock is shared between the loop and the workers: a worker preempted while holding one
    would make the loop wait for the GIL to come round (a convoy, measured at ~0.2 ms a sync
    step when dozens finish at once). Idle workers leave a token in a queue instead, which
    `submit` takes without blocking; only starting a thread takes a lock.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._work: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._idle: queue.SimpleQueue[None] = queue.SimpleQueue()  # a token per idle worker
        self._start_lock = threading.Lock()
        self._threads = 0

    def submit(self, call: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._work.put((call, future))
        try:
            self._idle.get_nowait()  # an idle worker takes it
        except queue.Empty:
            self._start_worker()  # none idle: one more, unless at the limit (then it waits)
        return future

    def _start_worker(self) -> None:
        with self._start_lock:
            if self._threads >= self._limit:
                return
            self._threads += 1
            number = self._threads
        threading.Thread(target=self._serve, name=f"flowcore-{number}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            call, future = self._work.get()
            # A future cancelled before its turn (the step was cancelled) never runs.
            if future.set_running_or_notify_cancel():
                try:
                    result = call()
                except BaseException as exc:  # KeyboardInterrupt/SystemExit too: the step's
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                del call, future
            self._idle.put(None)


_pool: _DaemonPool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _DaemonPool:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = _DaemonPool(max_threads())
    return _pool


async def run_in_worker_thread(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run `func` in a flowcore worker thread with the caller's context variables (the step
    context, captured output). Cancelling the await abandons the thread's result."""
    ctx = contextvars.copy_context()
    future = _get_pool().submit(functools.partial(ctx.run, func, *args, **kwargs))
    return await asyncio.wrap_future(future)
