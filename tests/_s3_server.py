"""A real S3-compatible server for the tests: `moto.server` as a subprocess on 127.0.0.1.

`s3_endpoint` (session) starts it on a free port and waits until it says it is serving;
`s3_bucket` (per test) makes a fresh bucket and sets dummy AWS credentials in the environment.
Import both into a test module (`from _s3_server import s3_bucket, s3_endpoint`).
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

__all__ = ["S3", "free_port", "moto_server", "s3_bucket", "s3_endpoint", "s3_filesystem"]

DUMMY_KEY = "flowcore-test"
_START_TIMEOUT = 60.0
_counter = itertools.count()


@dataclass(frozen=True)
class S3:
    """A bucket on the test server, and what a store needs to reach it."""

    endpoint: str
    bucket: str

    @property
    def options(self) -> dict[str, Any]:
        """storage_options for FsspecArtifactStore."""
        return {"endpoint_url": self.endpoint, "key": DUMMY_KEY, "secret": DUMMY_KEY}

    def url(self, prefix: str = "flowcore") -> str:
        return f"s3://{self.bucket}/{prefix}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _drain(stream: IO[str], log: Path, ready: threading.Event) -> None:
    """Copy the server's output to a log file (a full pipe would block it) and signal
    readiness when it says it is serving."""
    with open(log, "a", encoding="utf-8") as out:
        for line in stream:
            out.write(line)
            out.flush()
            if "Running on" in line:
                ready.set()
    ready.set()  # the server ended: let the waiter see it


def s3_filesystem(endpoint: str) -> Any:
    """A fresh s3fs filesystem on the test server (the tests' own, to create and damage)."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, key=DUMMY_KEY, secret=DUMMY_KEY,
                             skip_instance_cache=True, use_listings_cache=False)


@contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """Run `moto.server` on 127.0.0.1 and a free port; yield its endpoint URL (also used by
    the benchmarks, which start their own)."""
    port = free_port()
    log = log_dir / "moto-server.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": DUMMY_KEY, "AWS_SECRET_ACCESS_KEY": DUMMY_KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env=env)
    assert proc.stdout is not None
    ready = threading.Event()
    drain = threading.Thread(target=_drain, args=(proc.stdout, log, ready), daemon=True)
    drain.start()
    try:
        if not ready.wait(_START_TIMEOUT) or proc.poll() is not None:
            raise RuntimeError(f"moto.server did not start on port {port}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        drain.join(10)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a moto S3 server started for this test session on 127.0.0.1."""
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """A new, empty bucket on the session's server (emptied and removed afterwards, since
    the server keeps every object in memory); dummy credentials in the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"flowcore-test-{os.getpid()}-{next(_counter)}"
    fs = s3_filesystem(s3_endpoint)
    fs.mkdir(bucket)
    yield S3(endpoint=s3_endpoint, bucket=bucket)
    fs.rm(bucket, recursive=True)
