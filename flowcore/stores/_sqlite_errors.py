"""The one place where sqlite3 and aiosqlite errors become StoreErrors (httpcore's
`map_exceptions` shape): every boundary of the SQLite store runs inside `StoreErrors(...)(op)`."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from flowcore.exceptions import StoreError

__all__ = ["StoreErrors"]

# aiosqlite raises sqlite3's own classes (aiosqlite.Error is sqlite3.Error); sqlite3 raises
# UnicodeEncodeError itself when it binds text it cannot encode.
_MAPPED = (sqlite3.Error, UnicodeEncodeError)


class StoreErrors:
    """Translates the errors of one metadata store file, naming the file and the operation.

    `with errors("reading"):` around a boundary raises a StoreError (its cause the original)
    for a sqlite3 error; errors kept as values (a write's outcome in a group commit) go through
    `translate`, the same rule. Anything else, a FlowcoreError a statement raised on purpose
    (RunNameConflictError) included, passes unchanged.
    """

    __slots__ = ("busy_timeout", "path")

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout

    @contextlib.contextmanager
    def __call__(self, operation: str) -> Iterator[None]:
        try:
            yield
        except _MAPPED as exc:
            raise self.translate(exc, operation) from exc

    def translate(self, exc: BaseException, operation: str) -> BaseException:
        """The StoreError for `exc` met while `operation`; `exc` itself if it is no store error."""
        if not isinstance(exc, _MAPPED):
            return exc
        text = str(exc)
        where = f"metadata store {self.path} ({operation})"
        if "not a database" in text or "malformed" in text:
            msg = (f"{where}: the file is not a usable flowcore metadata database ({text}); "
                   "move it away, or point FLOWCORE_HOME / the stack at another path")
        elif "unable to open" in text:
            msg = f"{where}: cannot open the file ({text}); is the directory {self.path.parent} writable?"
        elif "readonly" in text:
            msg = f"{where}: the file may not be written ({text}); check its permissions"
        elif "locked" in text or "busy" in text:
            msg = (f"{where}: the file stayed locked by another process for more than "
                   f"{self.busy_timeout:g}s ({text})")
        elif "full" in text:
            msg = f"{where}: the disk is full ({text})"
        else:
            msg = f"{where}: {type(exc).__name__}: {text}"
        error = StoreError(msg)
        error.__cause__ = exc
        return error
