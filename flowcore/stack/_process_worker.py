"""A ProcessStepOperator worker process: its handle in the parent and its entry point in the
child."""

from __future__ import annotations

import asyncio
import inspect
import sys
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["Worker", "worker_main"]


def _call(payload: bytes) -> tuple[str, Any]:
    import cloudpickle

    try:
        sys_path, body = cloudpickle.loads(payload)
        for entry in sys_path:
            if entry not in sys.path:
                sys.path.append(entry)
        func, kwargs, is_async = cloudpickle.loads(body)
        result = func(**kwargs)
        if is_async or inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        return "ok", result
    except BaseException as exc:  # reported to the parent, which raises it as the step's error
        return "err", exc


async def _await(awaitable: Any) -> Any:
    return await awaitable


def worker_main(conn: Connection) -> None:
    """Serve calls one at a time until the parent closes the pipe."""
    import cloudpickle

    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        status, value = _call(payload)
        try:
            reply = cloudpickle.dumps((status, value))
        except Exception as exc:
            reply = cloudpickle.dumps(
                ("err", RuntimeError(f"step result could not be pickled: {exc!r}; "
                                     f"original: {value!r}"))
            )
        try:
            conn.send_bytes(reply)
        except (BrokenPipeError, OSError):
            return


class Worker:
    """One child process serving calls over a pipe (the parent's handle on it)."""

    def __init__(self, ctx: Any) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.conn: Connection = parent
        self.process = ctx.Process(target=worker_main, args=(child,), daemon=True,
                                   name="flowcore-step-worker")
        self.process.start()
        child.close()

    def roundtrip(self, payload: bytes) -> bytes:
        """Send one call and wait for its reply (blocking: run it in a thread)."""
        self.conn.send_bytes(payload)
        return self.conn.recv_bytes()

    @property
    def alive(self) -> bool:
        return bool(self.process.is_alive())

    def kill(self) -> None:
        """Stop the process now, whatever it is running (how a cancelled step is stopped)."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()
