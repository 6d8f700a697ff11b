"""The PostgreSQL metadata store (API.md §18) on a real server: the store's behaviour and real
pipelines through a Stack (several processes: tests/test_postgres_processes.py)."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
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
