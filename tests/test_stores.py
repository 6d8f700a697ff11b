"""Metadata stores: one behaviour suite for memory, SQLite and Postgres + S3, then what only
SQLite does."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from flowcore._models import (
    ErrorInfo,
    HookError,
    PipelineRun,
    RunStatus,
    StepRun,
    StepRunConfig,
    StepStatus,
)
from flowcore.exceptions import (
    ArtifactLoadError,
    RunNameConflictError,
    RunNotFoundError,
    StoreError,
)
from flowcore.materializers import materializer_for
from flowcore.stores._base import ArtifactStore, MetadataStore
from flowcore.stores._local import LocalArtifactStore
from flowcore.stores._memory import InMemoryArtifactStore, InMemoryMetadataStore
from flowcore.stores._sqlite import SqliteMetadataStore

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@dataclass
class Stores:
    metadata: MetadataStore
    artifacts: ArtifactStore


def make_run(name: str, pipeline: str = "training", steps: tuple[str, ...] = ("load", "train"),
             *, start: datetime = T0, unlisted: bool = False) -> PipelineRun:
    run = PipelineRun(id=uuid.uuid4().hex, name=name, pipeline_name=pipeline, start_time=start,
                      parameters={"mode": "train"}, unlisted=unlisted)
    for step in steps:
        run.steps[step] = StepRun(id=uuid.uuid4().hex, name=step, step_name=step,
                                  pipeline_run_id=run.id,
                                  config=StepRunConfig(parameters={"lr": 0.1, "sizes": [1, 2]}))
    return run


async def complete(stores: Stores, run: PipelineRun, step: str, value: Any,
                   cache_key: str | None = None) -> StepRun:
    sr = run.steps[step]
    sr.status = StepStatus.COMPLETED
    sr.attempts = 1
    sr.cache_key = cache_key
    sr.start_time = T0
    sr.end_time = T0 + timedelta(seconds=2)
    sr.outputs["output"] = await stores.artifacts.save(
        value, materializer=materializer_for(type(value)), data_type=type(value), name="output",
        producer_step_run_id=sr.id, step_label=f"step '{step}'")
    await stores.metadata.update_step_run(run, sr)
    return sr


@pytest.fixture(params=["memory", "sqlite", "postgres+s3"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    """The in-memory stores, SQLite with local artifacts on real files under tmp_path, or a
    fresh PostgreSQL database with a fresh S3 bucket on the session's servers."""
    if request.param == "memory":
        s = Stores(InMemoryMetadataStore(), InMemoryArtifactStore())
    elif request.param == "postgres+s3":
        from flowcore.stores._fsspec import FsspecArtifactStore
        from flowcore.stores._postgres import PostgresMetadataStore

        shared = request.getfixturevalue("shared_stores")
        remote = FsspecArtifactStore(shared.artifacts, shared.storage_options)
        await remote.open()
        s = Stores(PostgresMetadataStore(shared.metadata, remote), remote)
    else:
        artifacts = LocalArtifactStore(tmp_path / "home" / "artifacts")
        s = Stores(SqliteMetadataStore(tmp_path / "home" / "flowcore.db", artifacts), artifacts)
    await s.metadata.open()
    await s.metadata.open()  # idempotent
    yield s
    await s.metadata.close()
    await s.metadata.close()  # idempotent


# -- the shared behaviour suite -------------------------------------------------------------


async def test_created_run_is_found_by_name_and_id(stores: Stores) -> None:
    """A created run reads back by name and by id with its PENDING step runs in order."""
    run = make_run("r1")
    await stores.metadata.create_run(run)
    for key in ("r1", run.id):
        got = await stores.metadata.get_run(key)
        assert (got.id, got.name, got.pipeline_name) == (run.id, "r1", "training")
        assert got.status is RunStatus.RUNNING and got.start_time == T0
        assert got.start_time.tzinfo is not None
        assert got.parameters == {"mode": "train"}
        assert list(got.steps) == ["load", "train"]
        assert all(s.status is StepStatus.PENDING for s in got.steps.values())
        assert got.steps["train"].config.parameters == {"lr": 0.1, "sizes": [1, 2]}


async def test_duplicate_run_name_conflicts(stores: Stores) -> None:
    """A second run with a used name raises RunNameConflictError naming the run."""
    await stores.metadata.create_run(make_run("nightly"))
    with pytest.raises(RunNameConflictError, match="nightly"):
        await stores.metadata.create_run(make_run("nightly", pipeline="other"))


async def test_unknown_run_is_not_found(stores: Stores) -> None:
    """get_run and delete_run of an unknown run raise RunNotFoundError (a KeyError too)."""
    with pytest.raises(RunNotFoundError, match="nope"):
        await stores.metadata.get_run("nope")
    with pytest.raises(KeyError):
        await stores.metadata.delete_run("nope")


async def test_run_and_step_updates_are_stored(stores: Stores) -> None:
    """Status, timings, attempts, errors and hook errors read back as they were written."""
    run = make_run("r1")
    await stores.metadata.create_run(run)
    sr = run.steps["load"]
    sr.status, sr.attempts = StepStatus.FAILED, 3
    sr.start_time, sr.end_time = T0, T0 + timedelta(seconds=1)
    sr.error = ErrorInfo(type="ValueError", message="bad", traceback="Traceback...")
    sr.cache_miss_reason = "parameters changed"
    sr.hook_errors = [HookError(hook="notify", kind="on_failure",
                                error=ErrorInfo(type="OSError", message="x", traceback="tb"))]
    await stores.metadata.update_step_run(run, sr)
    run.status, run.end_time = RunStatus.FAILED, T0 + timedelta(seconds=5)
    await stores.metadata.update_run(run)

    got = await stores.metadata.get_run("r1")
    assert got.status is RunStatus.FAILED and got.end_time == T0 + timedelta(seconds=5)
    step = got.steps["load"]
    assert (step.status, step.attempts, step.cache_miss_reason) == (
        StepStatus.FAILED, 3, "parameters changed")
    assert step.error == ErrorInfo(type="ValueError", message="bad", traceback="Traceback...")
    assert step.hook_errors == sr.hook_errors
    assert step.duration == 1.0


async def test_completed_step_is_cached_with_loadable_outputs(stores: Stores) -> None:
    """find_cached returns the completed step run under its key, with outputs that load."""
    run = make_run("r1")
    await stores.metadata.create_run(run)
    sr = await complete(stores, run, "load", {"rows": [1, 2, 3]}, cache_key="key-1")
    cached = await stores.metadata.find_cached("key-1")
    assert cached is not None and cached.id == sr.id and cached.name == "load"
    assert cached.output.load() == {"rows": [1, 2, 3]}
    assert await cached.output.aload() == {"rows": [1, 2, 3]}
    assert cached.output.content_hash == sr.output.content_hash
    assert await stores.metadata.find_cached("key-2") is None


async def test_newest_completed_step_wins_the_cache_key(stores: Stores) -> None:
    """Two completed step runs under one key: find_cached returns the newer one."""
    first, second = make_run("r1"), make_run("r2", start=T0 + timedelta(seconds=1))
    for run in (first, second):
        await stores.metadata.create_run(run)
    await complete(stores, first, "load", 1, cache_key="k")
    newer = await complete(stores, second, "load", 1, cache_key="k")
    cached = await stores.metadata.find_cached("k")
    assert cached is not None and cached.id == newer.id


async def test_failed_step_is_not_cached(stores: Stores) -> None:
    """A step run that did not complete is never returned as a cache hit."""
    run = make_run("r1")
    await stores.metadata.create_run(run)
    sr = run.steps["load"]
    sr.status, sr.cache_key = StepStatus.FAILED, "k"
    await stores.metadata.update_step_run(run, sr)
    assert await stores.metadata.find_cached("k") is None


async def test_artifact_is_found_by_id(stores: Stores) -> None:
    """get_artifact returns a stored output by id; an unknown id raises ArtifactLoadError."""
    run = make_run("r1")
    await stores.metadata.create_run(run)
    sr = await complete(stores, run, "load", [1.5, "x"])
    got = await stores.metadata.get_artifact(sr.output.id)
    assert got.load() == [1.5, "x"] and got.name == "output"
    assert got.materializer.endswith("BuiltInContainerMaterializer")
    with pytest.raises(ArtifactLoadError, match="missing-id"):
        await stores.metadata.get_artifact("missing-id")


async def test_list_runs_newest_first_with_filters(stores: Stores) -> None:
    """list_runs is newest first, filters by pipeline and status, limits, hides unlisted runs."""
    names = []
    for i in range(5):
        run = make_run(f"r{i}", pipeline="a" if i % 2 else "b", start=T0 + timedelta(seconds=i))
        await stores.metadata.create_run(run)
        names.append(run.name)
        if i == 3:
            run.status = RunStatus.COMPLETED
            await stores.metadata.update_run(run)
    await stores.metadata.create_run(make_run("hidden", start=T0 + timedelta(seconds=9),
                                              unlisted=True))
    assert [r.name for r in await stores.metadata.list_runs()] == names[::-1]
    assert [r.name for r in await stores.metadata.list_runs(pipeline_name="a")] == ["r3", "r1"]
    assert [r.name for r in await stores.metadata.list_runs(status="completed")] == ["r3"]
    assert [r.name for r in await stores.metadata.list_runs(status=RunStatus.RUNNING,
                                                             limit=2)] == ["r4", "r2"]
    listed = await stores.metadata.list_runs(limit=1)
    assert list(listed[0].steps) == ["load", "train"]
    assert (await stores.metadata.get_run("hidden")).unlisted


async def test_delete_run_removes_it_and_its_cache_entries(stores: Stores) -> None:
    """A deleted run is gone, and so are the cache entries of its step runs."""
    run = make_run("r1")
    await stores.metadata.create_run(run)
    await complete(stores, run, "load", 1, cache_key="k")
    await stores.metadata.delete_run("r1")
    with pytest.raises(RunNotFoundError):
        await stores.metadata.get_run(run.id)
    assert await stores.metadata.find_cached("k") is None
    await stores.metadata.create_run(make_run("r1"))  # the name is free again


async def test_clear_cache_per_pipeline(stores: Stores) -> None:
    """clear_cache forgets one pipeline's entries (or all) and says how many."""
    a, b = make_run("ra", pipeline="a"), make_run("rb", pipeline="b")
    for run in (a, b):
        await stores.metadata.create_run(run)
    await complete(stores, a, "load", 1, cache_key="a1")
    await complete(stores, a, "train", 2, cache_key="a2")
    await complete(stores, b, "load", 3, cache_key="b1")
    assert await stores.metadata.clear_cache("a") == 2
    assert await stores.metadata.find_cached("a1") is None
    assert await stores.metadata.find_cached("b1") is not None
    assert await stores.metadata.clear_cache() == 1
    assert await stores.metadata.find_cached("b1") is None


# -- SQLite only ----------------------------------------------------------------------------


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteMetadataStore]:
    """A SQLite metadata store on a real file, with local artifacts."""
    store = SqliteMetadataStore(tmp_path / "flowcore.db",
                                LocalArtifactStore(tmp_path / "artifacts"))
    await store.open()
    yield store
    await store.close()


def _raw(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row
    return db


async def test_status_changes_are_visible_to_another_connection_at_once(
    sqlite_store: SqliteMetadataStore, tmp_path: Path
) -> None:
    """Once update_step_run returns, another connection already sees the new status."""
    run = make_run("r1")
    await sqlite_store.create_run(run)
    run.steps["load"].status = StepStatus.RUNNING
    await sqlite_store.update_step_run(run, run.steps["load"])
    with _raw(tmp_path / "flowcore.db") as db:
        row = db.execute("SELECT status FROM step_runs WHERE name = 'load'").fetchone()
    assert row["status"] == "running"


async def test_parameters_that_are_not_json_are_stored_as_repr(
    sqlite_store: SqliteMetadataStore,
) -> None:
    """Parameters JSON cannot hold are stored as their repr; the rest stays structured."""
    run = make_run("r1")
    lock = threading.Lock()
    run.steps["load"].config.parameters = {"lock": lock, "keys": {(1, 2): "tuple key"},
                                           "ok": {"a": [1, None]}}
    await sqlite_store.create_run(run)
    params = (await sqlite_store.get_run("r1")).steps["load"].config.parameters
    assert params["ok"] == {"a": [1, None]}
    assert params["lock"] == repr(lock)
    assert params["keys"] == repr({(1, 2): "tuple key"})


async def test_concurrent_writes_are_group_committed(sqlite_store: SqliteMetadataStore) -> None:
    """Concurrent step updates share commits, and every one of them is stored."""
    run = make_run("r1", steps=tuple(f"s{i}" for i in range(60)))
    await sqlite_store.create_run(run)
    commits: list[str] = []
    db = sqlite_store._db
    assert db is not None
    # Count the COMMITs the store's own connection issues (white-box, through aiosqlite).
    await db._aio.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    for sr in run.steps.values():
        sr.status = StepStatus.RUNNING
    await asyncio.gather(*(sqlite_store.update_step_run(run, sr) for sr in run.steps.values()))
    assert 1 <= len(commits) <= 3
    got = await sqlite_store.get_run("r1")
    assert all(s.status is StepStatus.RUNNING for s in got.steps.values())


async def test_one_failing_write_does_not_undo_its_batch(sqlite_store: SqliteMetadataStore
                                                         ) -> None:
    """A write that fails inside a group commit is rolled back alone; the others commit."""
    await sqlite_store.create_run(make_run("taken"))
    runs = [make_run(f"ok{i}") for i in range(5)]
    results = await asyncio.gather(
        *(sqlite_store.create_run(r) for r in runs[:3]),
        sqlite_store.create_run(make_run("taken")),
        *(sqlite_store.create_run(r) for r in runs[3:]),
        return_exceptions=True,
    )
    assert isinstance(results[3], RunNameConflictError)
    assert [r for i, r in enumerate(results) if i != 3] == [None] * 5
    assert len(await sqlite_store.list_runs()) == 6


async def test_cancelled_writers_leave_no_transaction_open(
    sqlite_store: SqliteMetadataStore, tmp_path: Path
) -> None:
    """Cancelling the committer and queued writers keeps every write atomic and frees the lock."""
    run = make_run("r1", steps=tuple(f"s{i}" for i in range(30)))
    await sqlite_store.create_run(run)
    for sr in run.steps.values():
        sr.status = StepStatus.COMPLETED
    tasks = [asyncio.ensure_future(sqlite_store.update_step_run(run, sr))
             for sr in run.steps.values()]
    await asyncio.sleep(0)  # the first task is now committing; the rest are queued
    tasks[0].cancel()
    tasks[-1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[-1], asyncio.CancelledError)
    assert results[1:-1] == [None] * 28
    with _raw(tmp_path / "flowcore.db") as db:
        db.execute("PRAGMA busy_timeout = 0")
        db.execute("BEGIN IMMEDIATE")  # would raise "database is locked" if a write hung open
        db.execute("ROLLBACK")
    got = await sqlite_store.get_run("r1")
    # The committer's batch had reached the database: it is applied whole. The last writer
    # was still queued: its write never happened.
    assert all(got.steps[f"s{i}"].status is StepStatus.COMPLETED for i in range(29))
    assert got.steps["s29"].status is StepStatus.PENDING
    await sqlite_store.update_run(run)  # the store is still usable


async def test_anyio_cancel_scope_strands_no_queued_write(
    sqlite_store: SqliteMetadataStore, tmp_path: Path
) -> None:
    """Writers cancelled by an anyio scope (cancelled again at every await) leave nothing hung."""
    run = make_run("r1", steps=tuple(f"s{i}" for i in range(12)))
    await sqlite_store.create_run(run)
    steps = list(run.steps.values())
    for sr in steps:
        sr.status = StepStatus.RUNNING
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            for sr in steps[:10]:
                tg.start_soon(sqlite_store.update_step_run, run, sr)
            await anyio.lowlevel.checkpoint()  # one writer commits, the others queue
            scope.cancel()
    await asyncio.wait_for(sqlite_store.update_step_run(run, steps[10]), timeout=10)
    with _raw(tmp_path / "flowcore.db") as db:
        db.execute("PRAGMA busy_timeout = 0")
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
    got = await sqlite_store.get_run("r1")
    assert got.steps["s10"].status is StepStatus.RUNNING
    assert got.steps["s11"].status is StepStatus.PENDING


async def test_dead_local_process_marks_its_run_crashed(tmp_path: Path) -> None:
    """A RUNNING run whose process exited is marked CRASHED when a store opens."""
    db_path = tmp_path / "flowcore.db"
    code = (
        "import asyncio, os, uuid\n"
        "from datetime import UTC, datetime\n"
        "from flowcore._models import PipelineRun\n"
        "from flowcore.stores._local import LocalArtifactStore\n"
        "from flowcore.stores._sqlite import SqliteMetadataStore\n"
        "async def main():\n"
        f"    s = SqliteMetadataStore({str(db_path)!r}, LocalArtifactStore({str(tmp_path)!r}))\n"
        "    await s.open()\n"
        "    await s.create_run(PipelineRun(id=uuid.uuid4().hex, name='doomed',\n"
        "        pipeline_name='p', start_time=datetime.now(UTC)))\n"
        "    os._exit(0)\n"
        "asyncio.run(main())\n"
    )
    proc = await anyio.run_process([sys.executable, "-c", code], check=False,
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr.decode()
    store = SqliteMetadataStore(db_path, LocalArtifactStore(tmp_path))
    await store.open()
    try:
        doomed = await store.get_run("doomed")
        assert doomed.status is RunStatus.CRASHED and doomed.end_time is not None
        assert await store.mark_crashed_runs() == []
    finally:
        await store.close()


async def test_other_hosts_runs_crash_only_when_heartbeat_is_stale(
    sqlite_store: SqliteMetadataStore, tmp_path: Path
) -> None:
    """Runs of another host are CRASHED after 60 s without a heartbeat, not before; ours live."""
    mine = make_run("mine")
    await sqlite_store.create_run(mine)
    old = (datetime.now(UTC) - timedelta(seconds=120)).isoformat()
    fresh = datetime.now(UTC).isoformat()
    with _raw(tmp_path / "flowcore.db") as db:
        for name, beat in (("stale", old), ("fresh", fresh)):
            db.execute("INSERT INTO runs (id, name, pipeline_name, status, start_time, pid, host,"
                       " heartbeat) VALUES (?, ?, 'p', 'running', ?, 1, 'elsewhere', ?)",
                       (uuid.uuid4().hex, name, old, beat))
    assert await sqlite_store.mark_crashed_runs() == ["stale"]
    assert (await sqlite_store.get_run("fresh")).status is RunStatus.RUNNING
    assert (await sqlite_store.get_run("mine")).status is RunStatus.RUNNING
    await sqlite_store.heartbeat(mine)


async def test_row_with_our_pid_but_not_our_run_is_crashed(
    sqlite_store: SqliteMetadataStore, tmp_path: Path
) -> None:
    """A RUNNING row with this process's pid that this process did not start (pid reuse) crashes."""
    with _raw(tmp_path / "flowcore.db") as db:
        db.execute("INSERT INTO runs (id, name, pipeline_name, status, start_time, pid, host,"
                   " heartbeat) VALUES (?, 'reused', 'p', 'running', ?, ?, ?, ?)",
                   (uuid.uuid4().hex, T0.isoformat(), os.getpid(), socket.gethostname(),
                    datetime.now(UTC).isoformat()))
    assert await sqlite_store.mark_crashed_runs() == ["reused"]


async def test_a_file_that_is_no_database_is_a_store_error(tmp_path: Path) -> None:
    """Opening a corrupt or foreign file raises StoreError naming the path."""
    bad = tmp_path / "flowcore.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    store = SqliteMetadataStore(bad, LocalArtifactStore(tmp_path / "a"))
    with pytest.raises(StoreError, match=str(bad)):
        await store.open()


async def test_an_unusable_directory_is_a_store_error(tmp_path: Path) -> None:
    """A database whose directory cannot be created raises StoreError naming the directory."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = SqliteMetadataStore(blocker / "sub" / "flowcore.db", LocalArtifactStore(tmp_path))
    with pytest.raises(StoreError, match=str(blocker / "sub")):
        await store.open()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write to read-only directories")
async def test_a_read_only_directory_is_a_store_error(tmp_path: Path) -> None:
    """A database in a directory we may not write raises StoreError naming the directory."""
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    store = SqliteMetadataStore(ro / "flowcore.db", LocalArtifactStore(tmp_path))
    with pytest.raises(StoreError, match=str(ro)):
        await store.open()


async def test_schema_is_versioned_and_newer_schemas_refused(tmp_path: Path) -> None:
    """A new database is at the latest schema version; one from a newer flowcore raises
    StoreError."""
    from flowcore.stores._sqlite_schema import LATEST_VERSION

    path = tmp_path / "flowcore.db"
    store = SqliteMetadataStore(path, LocalArtifactStore(tmp_path))
    await store.open()
    await store.close()
    with _raw(path) as db:
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == (
            LATEST_VERSION)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(StoreError, match="newer"):
        await SqliteMetadataStore(path, LocalArtifactStore(tmp_path)).open()


async def test_reads_return_aware_utc_datetimes(sqlite_store: SqliteMetadataStore) -> None:
    """A naive start time is taken as UTC and read back timezone-aware."""
    run = make_run("r1", start=datetime(2026, 5, 1, 12, 0, 0))
    await sqlite_store.create_run(run)
    got = await sqlite_store.get_run("r1")
    assert got.start_time == datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


async def test_a_version_1_database_migrates_forward_keeping_its_runs(tmp_path: Path) -> None:
    """A database written at schema version 1 is migrated to the latest version on open,
    and the runs it held are still there (version 2 adds the step_logs table)."""
    import sqlite3

    from flowcore.stores._sqlite_schema import _MIGRATIONS, LATEST_VERSION

    path = tmp_path / "flowcore.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in _MIGRATIONS[1]:
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
    store = SqliteMetadataStore(path, LocalArtifactStore(tmp_path))
    await store.create_run(make_run("old"))
    await store.close()
    store = SqliteMetadataStore(path, LocalArtifactStore(tmp_path))
    assert (await store.get_run("old")).name == "old"
    await store.close()
    with _raw(path) as db:
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == (
            LATEST_VERSION)
        assert db.execute(
            "SELECT name FROM sqlite_master WHERE name = 'step_logs'").fetchone() is not None


async def test_concurrent_cache_lookups_are_answered_together(tmp_path: Path) -> None:
    """Many find_cached calls at once (a fully cached run) each get their own answer, hits
    and misses alike, from batched queries."""
    import asyncio

    from flowcore._models import ArtifactVersion, StepStatus

    store = SqliteMetadataStore(tmp_path / "flowcore.db", LocalArtifactStore(tmp_path / "a"))
    run = make_run("cached-src")
    await store.create_run(run)
    for i, sr in enumerate(list(run.steps.values())):
        sr.status = StepStatus.COMPLETED
        sr.cache_key = f"key-{i}"
        sr.outputs = {"output": ArtifactVersion(
            id=f"art-{i}", name="output", uri=str(tmp_path / f"u{i}"),
            materializer="m", data_type="builtins.int", content_hash=f"h{i}")}
        await store.update_step_run(run, sr)
    n = len(run.steps)
    keys = [f"key-{i}" for i in range(n)] + ["missing-1", "missing-2"]
    answers = await asyncio.gather(*(store.find_cached(k) for k in keys * 20))
    for key, hit in zip(keys * 20, answers, strict=True):
        if key.startswith("missing"):
            assert hit is None
        else:
            assert hit is not None and hit.cache_key == key
            assert hit.outputs["output"].id == f"art-{key.split('-')[1]}"
    await store.close()
