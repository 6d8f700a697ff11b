"""Per-step capture of what a step prints and logs, without mixing up concurrent steps.

While runs are active, `sys.stdout` / `sys.stderr` are wrapped by tees that still write to the
original streams and also append to the buffer of the step running in the current context
(a context variable, so sync steps in worker threads are told apart too), and a handler on the
root logger appends formatted log records the same way. Nothing is captured outside steps.
Text UTF-8 cannot encode (lone surrogates) is recorded escaped, and written through escaped
when the real stream refuses it.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from typing import Any, TextIO

from flowcore._models import encodable

__all__ = ["install", "set_buffer", "uninstall"]

_buffer: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "flowcore_step_output", default=None
)


class _Tee:
    """A stream that writes through and also records into the current step's buffer."""

    def __init__(self, original: TextIO) -> None:
        self._original = original

    def write(self, text: str) -> int:
        buf = _buffer.get()
        try:
            written = self._original.write(text)
        except UnicodeEncodeError:
            if buf is None:  # not a step's output: behave like the stream itself
                raise
            # A strict stream (a pipe, pytest's capture) refuses what the step printed, e.g. a
            # file name decoded with surrogateescape: printing must not fail the step.
            encoding = getattr(self._original, "encoding", None) or "utf-8"
            self._original.write(text.encode(encoding, "backslashreplace").decode(encoding))
            written = len(text)
        if buf is not None:
            buf.append(encodable(text))
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


class _StepLogHandler(logging.Handler):
    """Appends log records (not flowcore's own events) to the current step's buffer."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        buf = _buffer.get()
        if buf is None or record.name == "flowcore" or record.name.startswith("flowcore."):
            return
        try:
            buf.append(encodable(self.format(record)) + "\n")
        except Exception:
            self.handleError(record)


_lock = threading.Lock()
_users = 0
_handler = _StepLogHandler()
_saved: tuple[Any, Any] | None = None


def install() -> None:
    """Start capturing (reference-counted: concurrent runs share one installation)."""
    global _users, _saved
    with _lock:
        _users += 1
        if _users > 1:
            return
        _saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout)  # type: ignore[assignment,unused-ignore]
        sys.stderr = _Tee(sys.stderr)  # type: ignore[assignment,unused-ignore]
        logging.getLogger().addHandler(_handler)


def uninstall() -> None:
    """Stop capturing when the last run using it ends; streams replaced meanwhile by someone
    else (a test runner) are left alone."""
    global _users, _saved
    with _lock:
        _users -= 1
        if _users > 0:
            return
        logging.getLogger().removeHandler(_handler)
        if _saved is not None:
            out, err = _saved
            if isinstance(sys.stdout, _Tee) and sys.stdout._original is out:
                sys.stdout = out
            if isinstance(sys.stderr, _Tee) and sys.stderr._original is err:
                sys.stderr = err
        _saved = None


def set_buffer(buf: list[str] | None) -> contextvars.Token[list[str] | None]:
    """Make `buf` receive what is printed and logged in this context."""
    return _buffer.set(buf)


def reset_buffer(token: contextvars.Token[list[str] | None]) -> None:
    _buffer.reset(token)
