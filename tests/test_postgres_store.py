"""The PostgreSQL metadata store (API.md §18) on a real server: the store's behaviour, real
pipelines through a Stack, and what several processes sharing one database see (cache hits,
run names, crashes by heartbeat, cancel requests over LISTEN/NOTIFY, pool leases)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import _postgres_server
import asyncpg
import pytest

from flowcore import RunStatus, Stack, StepStatus, pipeline, step
from flowcore._models import ErrorInfo, HookError, PipelineRun, StepRun, StepRunConfig
from flowcore.exceptions import ArtifactLoadError, RunNameConflictError, RunNotFoundError, StoreError
from flowcore.materializers import materializer_for
from flowcore.stores._local import LocalArtifactStore
from flowcore.stores._postgres import PostgresMetadataStore

# The server and per-test database fixtures, registered in this module by name.
postgres_server = _postgres_server.postgres_server
postgres_url = _postgres_server.postgres_url

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def make_run(name: str, pipeline: str = "training", steps: tuple[str, ...] = ("load", "train"),
             *, start: datetime = T0, unlisted: bool = False) -> PipelineRun:
    run = PipelineRun(id=uuid.uuid4().hex, name=name, pipeline_name=pipeline, start_time=start,
                      parameters={"mode": "train"}, unlisted=unlisted)
    for s in steps:
        run.steps[s] = StepRun(id=uuid.uuid4().hex, name=s, step_name=s, pipeline_run_id=run.id,
                               config=StepRunConfig(parameters={"lr": 0.1}))
    return run


@pytest.fixture
async def store(postgres_url: str, tmp_path: Path) -> AsyncIterator[PostgresMetadataStore]:
    """An open Postgres metadata store on a fresh database, with local artifacts."""
    s = PostgresMetadataStore(postgres_url, LocalArtifactStore(tmp_path / "artifacts"))
    await s.open()
    await s.open()  # idempotent
    yield s
    await s.close()
    await s.close()  # idempotent


async def complete(store: PostgresMetadataStore, run: PipelineRun, name: str, value: Any,
                   cache_key: str | None = None) -> StepRun:
    sr = run.steps[name]
    sr.status, sr.attempts, sr.cache_key = StepStatus.COMPLETED, 1, cache_key
    sr.start_time, sr.end_time = T0, T0 + timedelta(seconds=2)
    sr.outputs["output"] = await store.artifact_store.save(
        value, materializer=materializer_for(type(value)), data_type=type(value), name="output",
        producer_step_run_id=sr.id, step_label=f"step '{name}'")
    await store.update_step_run(run, sr)
    return sr


# -- the store's behaviour -------------------------------------------------------------------


async def test_runs_and_steps_round_trip(store: PostgresMetadataStore) -> None:
    """A run reads back by name and id with its steps in order, and updates (status, times,
    errors, hook errors, waits) read back as written, times timezone-aware."""
    run = make_run("r1")
    run.resumed_from, run.source = "orig", "m:p"
    await store.create_run(run)
    for key in ("r1", run.id):
        got = await store.get_run(key)
        assert (got.id, got.name, got.status, got.start_time) == (run.id, "r1",
                                                                   RunStatus.RUNNING, T0)
        assert got.parameters == {"mode": "train"} and list(got.steps) == ["load", "train"]
        assert (got.resumed_from, got.source) == ("orig", "m:p")
        assert got.steps["train"].config.parameters == {"lr": 0.1}
    sr = run.steps["load"]
    sr.status, sr.attempts, sr.waited = StepStatus.FAILED, 3, 1.25
    sr.start_time, sr.end_time = T0, T0 + timedelta(seconds=1)
    sr.error = ErrorInfo(type="ValueError", message="bad", traceback="Traceback...")
    sr.hook_errors = [HookError(hook="h", kind="on_failure",
                                error=ErrorInfo(type="OSError", message="x", traceback="tb"))]
    await store.update_step_run(run, sr)
    run.status, run.end_time = RunStatus.FAILED, T0 + timedelta(seconds=5)
    await store.update_run(run)
    got = await store.get_run("r1")
    assert got.status is RunStatus.FAILED and got.end_time == T0 + timedelta(seconds=5)
    back = got.steps["load"]
    assert (back.status, back.attempts, back.waited, back.duration) == (StepStatus.FAILED, 3,
                                                                         1.25, 1.0)
    assert back.error == sr.error and back.hook_errors == sr.hook_errors
    with pytest.raises(RunNotFoundError, match="nope"):
        await store.get_run("nope")
    with pytest.raises(RunNotFoundError):
        await store.delete_run("nope")


async def test_a_used_name_conflicts_alone_in_its_batch(store: PostgresMetadataStore) -> None:
    """A used run name raises RunNameConflictError naming it and the pipeline that has it; the
    other runs of the same group commit are stored."""
    await store.create_run(make_run("taken", pipeline="first"))
    runs = [make_run(f"ok{i}") for i in range(5)]
    results = await asyncio.gather(*(store.create_run(r) for r in runs[:3]),
                                   store.create_run(make_run("taken", pipeline="second")),
                                   *(store.create_run(r) for r in runs[3:]),
                                   return_exceptions=True)
    assert isinstance(results[3], RunNameConflictError)
    assert "taken" in str(results[3]) and "first" in str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [None] * 5
    assert len(await store.list_runs()) == 6


async def test_cache_newest_wins_failed_never_and_clearing(store: PostgresMetadataStore) -> None:
    """find_cached returns the newest completed step run under a key with loadable outputs,
    never a failed one; clear_cache forgets one pipeline's entries or all; delete_run takes
    its cache entries and frees its name."""
    first, second = make_run("r1"), make_run("r2", pipeline="other")
    for run in (first, second):
        await store.create_run(run)
    await complete(store, first, "load", {"rows": [1, 2]}, cache_key="k")
    newer = await complete(store, second, "load", {"rows": [1, 2]}, cache_key="k")
    await complete(store, first, "train", 5, cache_key="k2")
    failed = second.steps["train"]
    failed.status, failed.cache_key = StepStatus.FAILED, "k3"
    await store.update_step_run(second, failed)
    hit = await store.find_cached("k")
    assert hit is not None and hit.id == newer.id and hit.output.load() == {"rows": [1, 2]}
    assert await store.find_cached("k3") is None
    assert (await store.get_artifact(newer.output.id)).load() == {"rows": [1, 2]}
    with pytest.raises(ArtifactLoadError, match="missing-id"):
        await store.get_artifact("missing-id")
    assert await store.clear_cache("training") == 1
    assert await store.find_cached("k2") is None and await store.find_cached("k") is not None
    await store.delete_run("r2")
    assert await store.find_cached("k") is None
    await store.create_run(make_run("r2"))  # the name is free again
    assert await store.clear_cache() == 0


async def test_list_runs_newest_first_with_filters(store: PostgresMetadataStore) -> None:
    """list_runs is newest first (equal start times: the later created first), filters by
    pipeline and status, limits, and hides unlisted runs."""
    names = []
    for i in range(5):
        run = make_run(f"r{i}", pipeline="a" if i % 2 else "b",
                       start=T0 + timedelta(seconds=min(i, 3)))
        await store.create_run(run)
        names.append(run.name)
        if i == 3:
            run.status = RunStatus.COMPLETED
            await store.update_run(run)
    await store.create_run(make_run("hidden", start=T0 + timedelta(seconds=9), unlisted=True))
    assert [r.name for r in await store.list_runs()] == names[::-1]
    assert [r.name for r in await store.list_runs(pipeline_name="a")] == ["r3", "r1"]
    assert [r.name for r in await store.list_runs(status="completed")] == ["r3"]
    assert [r.name for r in await store.list_runs(status=RunStatus.RUNNING, limit=2)] == ["r4",
                                                                                          "r2"]
    assert (await store.get_run("hidden")).unlisted


async def test_recorded_writes_commit_in_one_statement_and_fan_out_rows_append(
    store: PostgresMetadataStore, postgres_url: str,
) -> None:
    """Sixty recorded step writes, fan-out elements among them (each written twice), commit
    as ONE statement that another connection sees whole; new elements go after the run's
    steps in the order they were recorded, with their configuration."""
    run = make_run("r1", steps=tuple(f"s{i}" for i in range(50)))
    await store.create_run(run)
    store.record_step_run(run, run.steps["s0"])
    await store.flush()  # the statement is prepared (asyncpg asks the server its types once)
    statements: list[str] = []
    store._writer.add_query_logger(lambda record: statements.append(record.query))
    for sr in run.steps.values():
        sr.status = StepStatus.RUNNING
        store.record_step_run(run, sr)
    for i in range(10):
        sr = StepRun(id=uuid.uuid4().hex, name=f"m[{i}]", step_name="m", pipeline_run_id=run.id,
                     config=StepRunConfig(parameters={"i": i}))
        run.steps[sr.name] = sr
        sr.status = StepStatus.RUNNING
        store.record_step_run(run, sr)
        sr.status = StepStatus.COMPLETED
        store.record_step_run(run, sr)  # the same row again, before any commit
    await store.flush()
    assert len(statements) == 1
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch("SELECT name, status FROM step_runs ORDER BY position")
    finally:
        await conn.close()
    assert [r["name"] for r in rows] == list(run.steps)
    assert [r["status"] for r in rows] == ["running"] * 50 + ["completed"] * 10
    element = run.steps["m[3]"]
    element.attempts = 2
    await store.update_step_run(run, element)  # a known row: its config is left as it is
    back = await store.get_run("r1")
    assert back.steps["m[3]"].config.parameters == {"i": 3}
    assert back.steps["m[3]"].attempts == 2


async def test_a_cancelled_committer_finishes_its_batch_and_leaves_no_transaction(
    store: PostgresMetadataStore, postgres_url: str,
) -> None:
    """Cancelling the writer that is committing and one still queued: the batch that reached
    the server is applied whole, the queued write never happens, no transaction stays open
    and the store stays usable."""
    run = make_run("r1", steps=tuple(f"s{i}" for i in range(30)))
    await store.create_run(run)
    for sr in run.steps.values():
        sr.status = StepStatus.COMPLETED
    for i in range(28):
        store.record_step_run(run, run.steps[f"s{i}"])
    committing = asyncio.ensure_future(store.update_step_run(run, run.steps["s28"]))
    await asyncio.sleep(0)  # it is now committing s0-s28 together
    queued = asyncio.ensure_future(store.update_step_run(run, run.steps["s29"]))
    await asyncio.sleep(0)
    committing.cancel()
    queued.cancel()
    results = await asyncio.gather(committing, queued, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    await store.flush()  # nothing was lost
    got = await store.get_run("r1")
    assert all(got.steps[f"s{i}"].status is StepStatus.COMPLETED for i in range(29))
    assert got.steps["s29"].status is StepStatus.PENDING
    conn = await asyncpg.connect(postgres_url)
    try:
        idle = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                   "current_database() AND state LIKE 'idle in transaction%'")
    finally:
        await conn.close()
    assert idle == 0
    await store.update_run(run)


async def test_text_postgres_cannot_hold_is_stored_escaped(store: PostgresMetadataStore) -> None:
    """A NUL character or a lone surrogate in an error or in logs is stored escaped, and
    never breaks the write."""
    run = make_run("r\udcff")
    await store.create_run(run)
    sr = run.steps["load"]
    sr.status = StepStatus.FAILED
    sr.error = ErrorInfo(type="E", message="nul\x00here \udcff", traceback="")
    sr.logs = "printed\x00"
    await store.update_step_run(run, sr)
    back = (await store.get_run("r\\udcff")).steps["load"]
    assert back.error is not None and back.error.message == "nul\\x00here \\udcff"
    assert await store.get_step_logs(sr.id) == "printed\\x00"
    assert await store.get_step_logs("nobody") == ""


async def test_cache_components_of_the_last_run_explain_a_miss(store: PostgresMetadataStore
                                                                ) -> None:
    """find_latest_cache_components returns the newest earlier run's components of a step of
    the same pipeline, None for an unknown step."""
    old, new = make_run("old"), make_run("new", start=T0 + timedelta(seconds=1))
    for run in (old, new):
        await store.create_run(run)
    old.steps["load"].cache_components = {"code": "abc"}
    await store.update_step_run(old, old.steps["load"])
    got = await asyncio.gather(store.find_latest_cache_components(new.id, "load"),
                               store.find_latest_cache_components(new.id, "nothing"))
    assert got == [{"code": "abc"}, None]


# -- schema ----------------------------------------------------------------------------------


async def test_schema_has_sqlite_tables_and_columns(store: PostgresMetadataStore,
                                                    postgres_url: str, tmp_path: Path) -> None:
    """The PostgreSQL schema has SQLite's tables and columns at the same version (plus only
    the `seq` stand-ins for rowid)."""
    from flowcore.stores._postgres_schema import LATEST_VERSION
    from flowcore.stores._sqlite_schema import _MIGRATIONS

    with sqlite3.connect(tmp_path / "x.db") as db:
        for version in range(1, LATEST_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                db.execute(statement)
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        lite = {t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")} for t in tables}
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch("SELECT table_name, column_name FROM information_schema.columns "
                                "WHERE table_schema = 'public' AND table_name != 'schema_version'")
        version = await conn.fetchval("SELECT MAX(version) FROM schema_version")
    finally:
        await conn.close()
    pg: dict[str, set[str]] = {}
    for r in rows:
        pg.setdefault(r["table_name"], set()).add(r["column_name"] if r["column_name"] != "seq"
                                                  else "")
    assert {t: cols - {""} for t, cols in pg.items()} == lite
    assert version == LATEST_VERSION


async def test_concurrent_first_opens_migrate_once(postgres_url: str, tmp_path: Path) -> None:
    """Three stores opening one new database at once all succeed and record each schema
    version once; a schema from a newer flowcore is refused with a StoreError."""
    artifacts = LocalArtifactStore(tmp_path / "a")
    stores = [PostgresMetadataStore(postgres_url, artifacts) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    await asyncio.gather(*(s.close() for s in stores))
    conn = await asyncpg.connect(postgres_url)
    try:
        versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_version")]
        assert len(versions) == len(set(versions)) >= 1
        await conn.execute("INSERT INTO schema_version VALUES (99)")
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="newer"):
        await PostgresMetadataStore(postgres_url, artifacts).open()


async def test_an_unreachable_server_is_a_prompt_store_error(tmp_path: Path,
                                                             postgres_url: str) -> None:
    """A server nobody listens for, or a database that does not exist, is a StoreError naming
    the server and database (never the password), raised within seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://flowcore:s3cret@127.0.0.1:{port}/flowcore"
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}/flowcore") as caught:
        await PostgresMetadataStore(url, LocalArtifactStore(tmp_path)).open()
    assert time.monotonic() - started < 10
    assert "s3cret" not in str(caught.value) and "opening" in str(caught.value)
    missing = postgres_url.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(StoreError, match=r"no_such_db.*does not exist"):
        await PostgresMetadataStore(missing, LocalArtifactStore(tmp_path)).get_run("x")


# -- real pipelines through a Stack ----------------------------------------------------------

LOADS: list[int] = []


@step
def load_numbers(n: int) -> list[int]:
    LOADS.append(n)
    return list(range(n))


@step
def add_up(xs: list[int]) -> int:
    return sum(xs)


@pipeline
def summing(n: int) -> None:
    add_up(load_numbers(n))


def pg_stack(url: str, tmp_path: Path, **options: float) -> Stack:
    """A stack on the Postgres database, with artifacts every process here can reach."""
    return Stack(artifact_store=LocalArtifactStore(tmp_path / "artifacts"),
                 metadata_factory=lambda a: PostgresMetadataStore(url, a, **options))


async def test_pipelines_round_trip_and_hit_the_cache_of_another_stack(
    postgres_url: str, tmp_path: Path,
) -> None:
    """A pipeline run on one stack is read back whole by a second Stack object on the same
    database, whose own run of it is all cache hits; a used run name is a
    RunNameConflictError there before any step runs."""
    first, second = pg_stack(postgres_url, tmp_path), pg_stack(postgres_url, tmp_path)
    try:
        LOADS.clear()
        run = await summing.with_options(stack=first, run_name="sum-1").run(4)
        assert run.status is RunStatus.COMPLETED and LOADS == [4]
        back = await (await second.metadata_store()).get_run("sum-1")
        assert {n: s.status for n, s in back.steps.items()} == {
            "load_numbers": StepStatus.COMPLETED, "add_up": StepStatus.COMPLETED}
        assert back.steps["add_up"].output.load() == 6
        again = await summing.with_options(stack=second, run_name="sum-2").run(4)
        assert {s.status for s in again.steps.values()} == {StepStatus.CACHED}
        assert LOADS == [4]  # no body ran on the second stack
        with pytest.raises(RunNameConflictError, match="sum-1"):
            await summing.with_options(stack=second, run_name="sum-1").run(5)
        assert LOADS == [4]
    finally:
        await first.close()
        await second.close()


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


async def test_a_stack_from_a_postgres_url(postgres_url: str, tmp_path: Path) -> None:
    """Stack.from_urls(postgresql://...?heartbeat_timeout=5) runs pipelines on the database
    with that lapse, and names the server (without its password) in its repr."""
    url = postgres_url.replace("flowcore@", "flowcore:pw@") + "?heartbeat_timeout=5"
    stack = Stack.from_urls(metadata=url, artifacts=str(tmp_path / "artifacts"))
    try:
        assert "pw" not in repr(stack)
        run = await summing.with_options(stack=stack).run(3)
        store = await stack.metadata_store()
        assert isinstance(store, PostgresMetadataStore)
        assert store._stale_after == timedelta(seconds=5)
        assert (await store.get_run(run.id)).steps["add_up"].output.load() == 3
    finally:
        await stack.close()
