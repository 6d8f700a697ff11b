"""Where asyncpg and network errors become StoreErrors naming the server (never its password)
and the operation; the PostgreSQL counterpart of `_sqlite_errors`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from flowcore.exceptions import StoreError

__all__ = ["PgErrors", "server_label"]


def server_label(url: str) -> str:
    """`postgresql://user@host:port/db`: where the store is, without password or options."""
    try:
        parts = urlsplit(url)
        user = f"{parts.username}@" if parts.username else ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"
    except ValueError:  # a malformed port: say no more than the scheme and host part
        return url.split("@")[-1].split("?")[0]


class PgErrors:
    """Translates the errors of one metadata store server, naming it and the operation.

    `with errors("reading"):` raises a StoreError (its cause the original) for a database or
    network error; anything else (a FlowcoreError raised on purpose) passes unchanged.
    """

    __slots__ = ("_asyncpg", "label")

    def __init__(self, label: str, asyncpg: Any) -> None:
        self.label = label
        self._asyncpg = asyncpg

    def _mapped(self, exc: BaseException) -> bool:
        pg = self._asyncpg
        return isinstance(exc, pg.PostgresError | pg.InterfaceError | OSError
                          | UnicodeEncodeError)

    @contextlib.contextmanager
    def __call__(self, operation: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if not self._mapped(exc):
                raise
            raise self.translate(exc, operation) from exc

    def translate(self, exc: BaseException, operation: str) -> BaseException:
        """The StoreError for `exc` met while `operation`; `exc` itself if no store error."""
        if isinstance(exc, StoreError) or not self._mapped(exc):
            return exc
        pg = self._asyncpg
        where = f"metadata store {self.label} ({operation})"
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TimeoutError):
            msg = f"{where}: the server did not answer in time; is it running and reachable?"
        elif isinstance(exc, OSError):
            msg = f"{where}: cannot reach the server ({detail}); is it running and reachable?"
        elif isinstance(exc, pg.InvalidCatalogNameError):
            msg = f"{where}: the database does not exist ({exc}); create it first"
        elif isinstance(exc, pg.InvalidAuthorizationSpecificationError | pg.InvalidPasswordError):
            msg = f"{where}: the server refused the login ({exc}); check the user and password"
        elif isinstance(exc, pg.PostgresConnectionError | pg.InterfaceError):
            msg = f"{where}: the connection to the server failed ({detail})"
        else:
            msg = f"{where}: {detail}"
        error = StoreError(msg)
        error.__cause__ = exc
        return error
