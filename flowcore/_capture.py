"""Per-step capture of what a step prints and logs, without mixing up concurrent steps.

While runs are active, `sys.stdout` / `sys.stderr` are wrapped by tees that still write to the
original streams and also append to the buffer of the step running in the current context
(a context variable, so sync steps in worker threads are told apart too), and a handler on the
root logger appends formatted log records the same way. Nothing is captured outside steps.
Text UTF-8 cannot encode (lone surrogates) is recorded escaped, and written through escaped
when the real stream refuses it.

A step's capture is bounded: a `CaptureBuffer` keeps only the last `limit_bytes` (default
1 MB) of what the step wrote, in a ring of chunks it drops from the front, and says how much
it dropped when its text is taken (joined once, at the end of the step).
"""

from __future__ import annotations

import collections
import contextvars
import logging
import sys
import threading
from typing import Any, TextIO

from flowcore._models import encodable

__all__ = ["DEFAULT_LOG_LIMIT", "CaptureBuffer", "install", "set_buffer", "uninstall"]

DEFAULT_LOG_LIMIT = 1024 * 1024  # bytes of a step's output kept: the last 1 MB


_APPEND_LOCK = threading.Lock()


class CaptureBuffer:
    """The last `limit_bytes` of what one step printed and logged.

    Appends are chunks kept in a deque; once more than the limit is held, whole chunks are
    dropped from the front (the oldest chunk still needed is cut when the text is taken), so
    at most the limit plus one chunk is ever held, and the kept text is joined only once.
    Sizes are counted in characters, which for the ASCII most logs are equals UTF-8 bytes
    and otherwise keeps somewhat more; a step's threads may append concurrently.

    Args:
        limit_bytes: how much of the end of the output to keep; 0 keeps nothing (but still
            counts what was dropped), None keeps everything.
    """

    __slots__ = ("_chunks", "_dropped", "_held", "_limit", "_lock")

    def __init__(self, limit_bytes: int | None = DEFAULT_LOG_LIMIT) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0 or None, not {limit_bytes}")
        self._limit = limit_bytes
        # Made on the first append: most steps print nothing, and a buffer is made per step.
        self._chunks: collections.deque[str] | None = None
        self._held = 0  # characters in _chunks
        self._dropped = 0  # characters dropped from the front so far
        # One lock for every buffer: appends are short and rare next to a step's other work,
        # and a lock per step would cost more to create than it ever saves.
        self._lock = _APPEND_LOCK

    def append(self, text: str) -> None:
        """Record `text` (what a step wrote), dropping the oldest output beyond the limit."""
        if not text:
            return
        limit = self._limit
        with self._lock:
            if limit is not None and len(text) > limit:
                # One write longer than the limit: only its end can be kept; hold no more.
                self._dropped += len(text) - limit
                text = text[len(text) - limit:] if limit else ""
            chunks = self._chunks
            if chunks is None:
                chunks = self._chunks = collections.deque()
            chunks.append(text)
            self._held += len(text)
            if limit is None:
                return
            # Drop whole chunks only while what is left still covers the limit.
            while chunks and self._held - len(chunks[0]) >= limit:
                first = chunks.popleft()
                self._held -= len(first)
                self._dropped += len(first)

    @property
    def dropped(self) -> int:
        """How many characters of earlier output were dropped so far."""
        with self._lock:
            excess = 0 if self._limit is None else max(0, self._held - self._limit)
            return self._dropped + excess

    def text(self) -> str | None:
        """The kept output, after a marker line saying how much was dropped; None if the step
        wrote nothing."""
        if self._chunks is None and not self._dropped:
            # Nothing written yet (the common step): no lock. An append racing this read
            # (a timed-out sync body still printing) counts as one made just after it.
            return None
        with self._lock:
            if not self._chunks and not self._dropped:
                return None
            kept = "".join(self._chunks or ())
            dropped = self._dropped
        if self._limit is not None and len(kept) > self._limit:
            cut = len(kept) - self._limit
            kept = kept[cut:]
            dropped += cut
        if not dropped:
            return kept
        return f"[flowcore: {_size(dropped)} of earlier output dropped]\n{kept}"


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n} bytes"


_buffer: contextvars.ContextVar[list[str] | CaptureBuffer | None] = contextvars.ContextVar(
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


def set_buffer(
    buf: CaptureBuffer | list[str] | None,
) -> contextvars.Token[list[str] | CaptureBuffer | None]:
    """Make `buf` receive what is printed and logged in this context (a list keeps
    everything; it is still accepted until every caller passes a CaptureBuffer)."""
    return _buffer.set(buf)


def reset_buffer(token: contextvars.Token[list[str] | CaptureBuffer | None]) -> None:
    _buffer.reset(token)
