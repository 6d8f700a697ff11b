"""A real PostgreSQL server for the tests: a private cluster in a temp directory.

`postgres_server` (session) runs `initdb` and `pg_ctl start` from Debian's
/usr/lib/postgresql/*/bin (or PATH) on 127.0.0.1 and a free port, trust authentication,
superuser `flowcore`; it is stopped and removed at the end of the session. PostgreSQL refuses
to run as root, so under root every server command runs as the `postgres` user
(`runuser -u postgres --`) on a directory owned by it. `postgres_url` (per test) creates a
fresh database and yields its URL, so tests never see each other's rows. Import both into a
test module (`from _postgres_server import postgres_server, postgres_url`).
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "create_database", "postgres_server", "postgres_url", "running_postgres"]

_MISSING = "PostgreSQL server binaries not found: apt-get install postgresql"
_counter = itertools.count()


@dataclass(frozen=True)
class PostgresServer:
    """A running test cluster: where its binaries are, and its base URL (no database)."""

    bin_dir: Path
    host: str
    port: int
    user: str = "flowcore"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"


def _bin_dir() -> Path | None:
    """The newest Debian-packaged server, else one on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name
                   .isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _as_server_user(cmd: list[str]) -> list[str]:
    """The command as the `postgres` user when we are root (the server will not run as root)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(_as_server_user(cmd), capture_output=True, text=True, timeout=120,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")


def create_database(server: PostgresServer, name: str) -> str:
    """Create database `name` on the test server and return its URL."""
    _run([str(server.bin_dir / "createdb"), "-h", server.host, "-p", str(server.port),
          "-U", server.user, name], f"createdb {name}")
    return server.url(name)


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster on 127.0.0.1 and a free port for as long as the block
    runs (also used by the benchmarks). Raises RuntimeError when it cannot start."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError(_MISSING)
    # Not under pytest's tmp_path: its parents are private to root, and the server user must
    # reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="flowcore-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "flowcore", "--auth=trust",
          "-E", "UTF8", "--no-sync", "--no-instructions"], "initdb")
    server = None
    try:
        for _ in range(5):  # a free port can be taken by someone else before we bind it
            port = _free_port()
            options = (f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off "
                       "-c full_page_writes=off -c max_connections=300")
            try:
                _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"),
                      "-o", options, "-w", "-t", "60", "start"], "pg_ctl start")
            except RuntimeError:
                continue
            server = PostgresServer(bin_dir=bin_dir, host="127.0.0.1", port=port)
            break
        if server is None:
            log = (root / "server.log").read_text(errors="replace") if (
                root / "server.log").exists() else ""
            raise RuntimeError(f"the PostgreSQL test server did not start:\n{log}")
        yield server
    finally:
        if server is not None:
            subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m",
                                            "immediate", "-w", "stop"]),
                           capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster started for this test session, on 127.0.0.1 and a free port."""
    if _bin_dir() is None:
        pytest.skip(_MISSING)
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database on the session's test server."""
    return create_database(postgres_server, f"t{os.getpid()}_{next(_counter)}")
