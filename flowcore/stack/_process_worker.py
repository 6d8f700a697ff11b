"""The entry point of a ProcessStepOperator worker process (imported in the child)."""

from __future__ import annotations

import asyncio
import inspect
import sys
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["worker_main"]


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
