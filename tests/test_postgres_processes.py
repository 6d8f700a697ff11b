"""The PostgreSQL metadata store (API.md §18) seen by several processes sharing one database:
crashes told by heartbeat, cancel requests over LISTEN/NOTIFY, pool leases."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import _postgres_server
import asyncpg
import pytest
from test_postgres_store import make_run, pg_stack  # helpers (no tests) of the store module

from flowcore import RunStatus, StepStatus, pipeline, step
from flowcore._models import PipelineRun
from flowcore.stores._local import LocalArtifactStore
from flowcore.stores._postgres import PostgresMetadataStore

# The server and per-test database fixtures, registered in this module by name.
postgres_server = _postgres_server.postgres_server
postgres_url = _postgres_server.postgres_url

REPO = Path(__file__).resolve().parent.parent


# -- several processes -----------------------------------------------------------------------

RUNNER = textwrap.dedent('''
    import asyncio, os, sys
    from pathlib import Path
    from flowcore import Stack, pipeline, step
    from flowcore.stores._local import LocalArtifactStore
    from flowcore.stores._postgres import PostgresMetadataStore

    @step(enable_cache=False)
    async def slow() -> int:
        Path(os.environ["MARK"]).write_text("started")
        await asyncio.sleep(float(os.environ["SLOW"]))
        return 1

    @step(enable_cache=False)
    def after(x: int) -> int:
        return x + 1

    @pipeline(enable_cache=False)
    def long_run() -> None:
        after(slow())

    if __name__ == "__main__":
        lapse = float(os.environ["LAPSE"])
        stack = Stack(artifact_store=LocalArtifactStore(os.environ["ARTIFACTS"]),
                      metadata_factory=lambda a: PostgresMetadataStore(
                          os.environ["PG_URL"], a, heartbeat_timeout=lapse))
        run = long_run.with_options(stack=stack, run_name=sys.argv[1])()
        print(run.status.value, flush=True)
''')


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Helper processes, killed and reaped at the end of the test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def run_elsewhere(procs: list[subprocess.Popen[str]], url: str, tmp_path: Path, name: str, *,
                  lapse: float = 60.0) -> subprocess.Popen[str]:
    """Start `long_run` in another process on the database; return once its slow step runs."""
    script, mark = tmp_path / "runner.py", tmp_path / f"{name}.started"
    script.write_text(RUNNER)
    env = {**os.environ, "PG_URL": url, "ARTIFACTS": str(tmp_path / "artifacts"),
           "PYTHONPATH": str(REPO), "MARK": str(mark), "SLOW": "60", "LAPSE": str(lapse)}
    proc = subprocess.Popen([sys.executable, str(script), name], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(proc)
    deadline = time.monotonic() + 60
    while not mark.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never started: {proc.communicate()}")
        time.sleep(0.05)
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


async def test_a_frozen_runs_heartbeat_lapses_and_another_process_marks_it_crashed(
    postgres_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]],
) -> None:
    """A run heartbeating in another process stays RUNNING over several lapses; once that
    process stops heartbeating (SIGSTOP: its pid still exists, as a partitioned host's would)
    the lapse passes and this process marks it CRASHED: running step STOPPED, pending one
    SKIPPED, ended at its last heartbeat."""
    proc = run_elsewhere(procs, postgres_url, tmp_path, "doomed", lapse=1.5)
    store = PostgresMetadataStore(postgres_url, LocalArtifactStore(tmp_path / "a"),
                                  heartbeat_timeout=1.5)
    try:
        await asyncio.sleep(3.5)  # more than two lapses: only heartbeats keep it alive
        assert await store.mark_crashed_runs() == []
        assert await store.run_is_live("doomed")
        proc.send_signal(signal.SIGSTOP)
        frozen_at = datetime.now(UTC)
        deadline = time.monotonic() + 15
        while await store.mark_crashed_runs() != ["doomed"]:
            assert time.monotonic() < deadline, "the frozen run was never marked CRASHED"
            await asyncio.sleep(0.2)
        run = await store.get_run("doomed")
        assert run.status is RunStatus.CRASHED and not await store.run_is_live("doomed")
        assert (run.steps["slow"].status, run.steps["after"].status) == (StepStatus.STOPPED,
                                                                         StepStatus.SKIPPED)
        assert run.end_time is not None and run.end_time <= frozen_at + timedelta(seconds=1)
    finally:
        proc.kill()
        await store.close()


async def test_a_killed_run_on_this_host_is_crashed_at_once(
    postgres_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]],
) -> None:
    """A run whose process, in this process space, was SIGKILLed is CRASHED at once (its pid
    is gone), long before its 60 s heartbeat lapse: a cancel request says so."""
    proc = run_elsewhere(procs, postgres_url, tmp_path, "killed")
    store = PostgresMetadataStore(postgres_url, LocalArtifactStore(tmp_path / "a"))
    try:
        assert await store.run_is_live("killed")
        kill(proc)
        assert not await store.run_is_live("killed")
        assert await store.request_cancel("killed", drain=False) is RunStatus.CRASHED
        run = await store.get_run("killed")
        assert (run.steps["slow"].status, run.steps["after"].status) == (StepStatus.STOPPED,
                                                                         StepStatus.SKIPPED)
    finally:
        await store.close()


async def test_this_process_never_judges_its_own_runs_dead(postgres_url: str,
                                                           tmp_path: Path) -> None:
    """A run this process created is not CRASHED by any of its stores however stale its
    heartbeat; another host's row with a stale heartbeat is."""
    artifacts = LocalArtifactStore(tmp_path / "a")
    mine = PostgresMetadataStore(postgres_url, artifacts, heartbeat_timeout=0.5)
    other = PostgresMetadataStore(postgres_url, artifacts, heartbeat_timeout=0.5)
    try:
        run = make_run("mine")
        await mine.create_run(run)
        await other.open()
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(
                "INSERT INTO runs (id, name, pipeline_name, status, start_time, host, heartbeat) "
                "VALUES ('x', 'elsewhere', 'p', 'running', now(), 'far', now())")
        finally:
            await conn.close()
        await asyncio.sleep(1.0)  # two lapses without a heartbeat
        assert await other.mark_crashed_runs() == ["elsewhere"]
        assert await other.run_is_live("mine")
        assert (await other.get_run("mine")).status is RunStatus.RUNNING
    finally:
        await mine.close()
        await other.close()


async def test_a_cancel_request_from_another_process_stops_the_run_at_once(
    postgres_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]],
) -> None:
    """request_cancel on this process's store stops a run of another process: the request
    reaches it by notification (well before the writer's fallback look), its running step
    STOPPED, the next SKIPPED, the run STOPPED."""
    proc = run_elsewhere(procs, postgres_url, tmp_path, "far")
    store = PostgresMetadataStore(postgres_url, LocalArtifactStore(tmp_path / "a"))
    try:
        started = time.monotonic()
        assert await store.request_cancel("far", drain=False) is RunStatus.RUNNING
        while (run := await store.get_run("far")).status is RunStatus.RUNNING:
            assert time.monotonic() - started < 10, "the run was never stopped"
            await asyncio.sleep(0.02)
        took = time.monotonic() - started
        out, err = proc.communicate(timeout=30)
        assert out.strip() == "stopped", err
        assert run.status is RunStatus.STOPPED
        assert (run.steps["slow"].status, run.steps["after"].status) == (StepStatus.STOPPED,
                                                                         StepStatus.SKIPPED)
        # The fallback look comes every 5 s; a notification makes it a fraction of that.
        assert took < 4.0, took
    finally:
        await store.close()


async def test_a_cancel_request_reaches_a_run_on_another_event_loop(postgres_url: str,
                                                                    tmp_path: Path) -> None:
    """A run on another thread's event loop (its own store) is stopped by a request made
    through this loop's store instance, with drain: the running step finishes."""
    started = threading.Event()
    release = threading.Event()

    @step(enable_cache=False)
    def held() -> int:
        started.set()
        release.wait(30)
        return 1

    @step(enable_cache=False)
    def later(x: int) -> int:
        return x

    @pipeline(enable_cache=False)
    def two() -> None:
        later(held())

    stack = pg_stack(postgres_url, tmp_path)
    result: list[PipelineRun] = []

    async def elsewhere() -> None:
        try:
            result.append(await two.with_options(stack=stack, run_name="there").run())
        finally:
            await stack.close()

    thread = threading.Thread(target=lambda: asyncio.run(elsewhere()))
    thread.start()
    store = PostgresMetadataStore(postgres_url, LocalArtifactStore(tmp_path / "a"))
    try:
        assert await asyncio.to_thread(started.wait, 30)
        assert await store.request_cancel("there", drain=True) is RunStatus.RUNNING
        await asyncio.sleep(1.0)  # heard, and draining: the held body is let go only now
        release.set()
        await asyncio.to_thread(thread.join, 30)
        run = result[0]
        assert run.status is RunStatus.STOPPED
        assert (run.steps["held"].status, run.steps["later"].status) == (StepStatus.COMPLETED,
                                                                         StepStatus.SKIPPED)
        assert (await store.get_run("there")).status is RunStatus.STOPPED
    finally:
        release.set()
        thread.join(30)
        await store.close()


HOLDER = textwrap.dedent('''
    import asyncio, os
    from flowcore.stores._local import LocalArtifactStore
    from flowcore.stores._postgres import PostgresMetadataStore

    async def main():
        store = PostgresMetadataStore(os.environ["PG_URL"], LocalArtifactStore("a"),
                                      heartbeat_timeout=2.0)
        assert await store.acquire_slot("gpu", 1, "holder")
        print("ready", flush=True)
        await store.serve_writes()  # renews the lease until the process dies

    asyncio.run(main())
''')


def hold_a_lease(procs: list[subprocess.Popen[str]], url: str, tmp_path: Path
                 ) -> subprocess.Popen[str]:
    """Start a process that takes the one slot of pool 'gpu' and keeps renewing it."""
    (tmp_path / "holder.py").write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "holder.py")], cwd=tmp_path,
                            env={**os.environ, "PG_URL": url, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


async def test_pool_leases_are_shared_renewed_and_freed_when_the_holder_is_gone(
    postgres_url: str, tmp_path: Path, procs: list[subprocess.Popen[str]],
) -> None:
    """Two stores share a pool's limit; a live holder in another process keeps its lease by
    renewing it past its lapse; a frozen holder's lease lapses; a SIGKILLed holder's slot is
    free at once."""
    artifacts = LocalArtifactStore(tmp_path / "a")
    one, two = (PostgresMetadataStore(postgres_url, artifacts) for _ in range(2))
    try:
        assert await one.acquire_slot("cpu", 2, "h1")
        assert await two.acquire_slot("cpu", 2, "h2")
        assert not await two.acquire_slot("cpu", 2, "h3")
        assert await one.acquire_slot("cpu", 2, "h1")  # already held
        await one.release_slot("cpu", "h1")
        assert await two.acquire_slot("cpu", 2, "h3")

        frozen = hold_a_lease(procs, postgres_url, tmp_path)
        await asyncio.sleep(3.0)  # past the 2 s lapse: only renewal keeps it
        assert not await one.acquire_slot("gpu", 1, "me")
        frozen.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not await one.acquire_slot("gpu", 1, "me"):
            assert time.monotonic() < deadline, "the frozen holder's lease never lapsed"
            await asyncio.sleep(0.2)
        frozen.kill()
        await one.release_slot("gpu", "me")

        killed = hold_a_lease(procs, postgres_url, tmp_path)
        assert not await one.acquire_slot("gpu", 1, "me")
        kill(killed)
        assert await one.acquire_slot("gpu", 1, "me")
    finally:
        await one.close()
        await two.close()
