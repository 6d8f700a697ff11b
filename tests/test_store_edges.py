"""Store edge cases: text that cannot be encoded, rows left unfinished, damaged files, leaks."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flowcore import AsyncClient, Client, Stack, pipeline, step
from flowcore._models import PipelineRun, RunStatus, StepRun, StepRunConfig, StepStatus
from flowcore.exceptions import RunFailedError, StoreError
from flowcore.stores._local import LocalArtifactStore
from flowcore.stores._sqlite import SqliteMetadataStore

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

# What os.fsdecode gives for a file name that is not UTF-8: a lone surrogate.
BAD = os.fsdecode(b"\xff")
ESCAPED = "\\udcff"


def _hook_raises() -> None:
    raise ValueError(f"hook {BAD}")


@step(enable_cache=False, on_success=_hook_raises)
def sync_printer() -> str:
    print(f"sync printed {BAD}")
    return f"sync value {BAD}"


@step(enable_cache=False)
async def async_printer(text: str) -> str:
    print(f"async printed {BAD}")
    return text + BAD


@step(enable_cache=False)
def sync_raiser() -> None:
    raise ValueError(f"sync raised {BAD}")


@step(enable_cache=False)
async def async_raiser() -> None:
    raise ValueError(f"async raised {BAD}")


@pipeline
def surrogates() -> None:
    async_printer(sync_printer())
    sync_raiser()
    async_raiser()


def _encodes(text: str) -> str:
    text.encode("utf-8")  # raises if a lone surrogate was stored as it came
    return text


def _check_stored(run: PipelineRun, logs: dict[str, str]) -> None:
    assert run.status is RunStatus.FAILED
    assert {n: s.status for n, s in run.steps.items()} == {
        "sync_printer": StepStatus.COMPLETED, "async_printer": StepStatus.COMPLETED,
        "sync_raiser": StepStatus.FAILED, "async_raiser": StepStatus.FAILED,
    }
    assert f"sync printed {ESCAPED}" in _encodes(logs["sync_printer"])
    assert f"async printed {ESCAPED}" in _encodes(logs["async_printer"])
    for name in ("sync_raiser", "async_raiser"):
        error = run.steps[name].error
        assert error is not None
        assert _encodes(error.message) == f"{name.split('_')[0]} raised {ESCAPED}"
        assert ESCAPED in _encodes(error.traceback)
    (hook_error,) = run.steps["sync_printer"].hook_errors
    assert _encodes(hook_error.error.message) == f"hook {ESCAPED}"


def test_unencodable_text_from_sync_call_is_stored_escaped(stack: Stack) -> None:
    """Lone surrogates printed, raised and raised by hooks are stored escaped by `p()`, and an
    output value holding one loads back exactly, on both stores."""
    with pytest.raises(RunFailedError):
        surrogates()
    client = Client(stack)
    (run,) = client.list_pipeline_runs()
    _check_stored(run, {n: client.get_step_logs(run.name, n) for n in run.steps})
    assert run.steps["sync_printer"].output.load() == f"sync value {BAD}"
    assert run.steps["async_printer"].output.load() == f"sync value {BAD}{BAD}"


async def test_unencodable_text_from_async_run_is_stored_escaped(stack: Stack) -> None:
    """The same holds for `await p.run()`, read back through AsyncClient."""
    with pytest.raises(RunFailedError):
        await surrogates.run()
    client = AsyncClient(stack)
    (run,) = await client.list_pipeline_runs()
    _check_stored(run, {n: await client.get_step_logs(run.name, n) for n in run.steps})
    assert await run.steps["async_printer"].output.aload() == f"sync value {BAD}{BAD}"


def test_a_str_output_with_a_lone_surrogate_stays_json_and_loads_back_exactly(
    tmp_path: Path,
) -> None:
    """A str output holding a lone surrogate is stored by the built-in JSON materializer (no
    pickle fallback, no warning) and loads back exactly."""

    @step(enable_cache=False)
    def make() -> str:
        return f"a{BAD}b"

    @pipeline
    def one() -> None:
        make()

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = one.with_options(stack=Stack.local(tmp_path))()
    artifact = run.steps["make"].output
    assert artifact.materializer.endswith("BuiltInMaterializer")
    assert artifact.load() == f"a{BAD}b"


def test_unencodable_run_name_is_stored_escaped_and_found_by_its_raw_name(stack: Stack) -> None:
    """A run name with a lone surrogate (from a substitution) is stored, and found again."""
    run = surrogates.with_options(run_name="r-{where}", substitutions={"where": BAD},
                                  enable_cache=False)
    with pytest.raises(RunFailedError) as info:
        run()
    assert info.value.run is not None
    stored = Client(stack).get_pipeline_run(info.value.run.name)
    assert stored.status is RunStatus.FAILED
    assert all(s.status.is_finished for s in stored.steps.values())


# -- no step row stays unfinished ------------------------------------------------------------


def _run_with_steps(name: str, statuses: dict[str, StepStatus]) -> PipelineRun:
    run = PipelineRun(id=uuid.uuid4().hex, name=name, pipeline_name="p", start_time=T0)
    for step_name, status in statuses.items():
        sr = StepRun(id=uuid.uuid4().hex, name=step_name, step_name=step_name,
                     pipeline_run_id=run.id, config=StepRunConfig(), status=status)
        if status is not StepStatus.PENDING:
            sr.start_time = T0
        if status.is_finished:
            sr.end_time = T0 + timedelta(seconds=1)
        run.steps[step_name] = sr
    return run


@pytest.mark.parametrize("final", [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.STOPPED,
                                   RunStatus.CRASHED])
def test_unfinished_steps_of_finished_runs_are_stopped_when_the_store_opens(
    tmp_path: Path, final: RunStatus,
) -> None:
    """Opening the store from a fresh stack marks STOPPED the pending, running and retrying step
    rows of runs already finished, with the run's end time; finished steps and live runs stay."""
    end = T0 + timedelta(seconds=5)
    unfinished = {"pending": StepStatus.PENDING, "running": StepStatus.RUNNING,
                  "retrying": StepStatus.RETRYING}
    done = _run_with_steps("done", {**unfinished, "ok": StepStatus.COMPLETED})
    live = _run_with_steps("live", unfinished)

    async def write_rows() -> None:
        store = SqliteMetadataStore(tmp_path / "flowcore.db", LocalArtifactStore(tmp_path))
        await store.open()
        try:
            await store.create_run(done)
            await store.create_run(live)  # still running in this process: left alone
            done.status, done.end_time = final, end
            await store.update_run(done)
        finally:
            await store.close()

    asyncio.run(write_rows())
    with sqlite3.connect(tmp_path / "flowcore.db") as raw:
        rows = raw.execute("SELECT s.status FROM step_runs s JOIN runs r ON r.id = s.run_id "
                           "WHERE r.name = 'done' AND s.name != 'ok'").fetchall()
    assert sorted(r[0] for r in rows) == ["pending", "retrying", "running"]

    stored = Client(Stack.local(tmp_path)).get_pipeline_run("done")
    assert stored.status is final
    for step_name in unfinished:
        assert stored.steps[step_name].status is StepStatus.STOPPED, step_name
        assert stored.steps[step_name].end_time == end
    assert stored.steps["ok"].status is StepStatus.COMPLETED
    assert stored.steps["ok"].end_time == T0 + timedelta(seconds=1)
    still = Client(Stack.local(tmp_path)).get_pipeline_run("live")
    assert {n: s.status for n, s in still.steps.items()} == unfinished


def test_unfinished_steps_of_a_run_finished_by_another_process_are_stopped(tmp_path: Path) -> None:
    """Rows written raw into the file (a finished run whose step still reads RUNNING, with no
    end time anywhere) are finished by the next process that opens the store."""
    Client(Stack.local(tmp_path)).list_pipeline_runs()  # creates the schema
    with sqlite3.connect(tmp_path / "flowcore.db") as raw:
        raw.execute("INSERT INTO runs (id, name, pipeline_name, status, start_time, pid, host) "
                    "VALUES ('r1', 'old', 'p', 'failed', ?, 1, 'elsewhere')", (T0.isoformat(),))
        raw.execute("INSERT INTO step_runs (id, run_id, name, step_name, position, status, "
                    "start_time) VALUES ('s1', 'r1', 'train', 'train', 0, 'running', ?)",
                    (T0.isoformat(),))
    code = ("import sys; from flowcore import Client, Stack; "
            "r = Client(Stack.local(sys.argv[1])).get_pipeline_run('old'); "
            "s = r.steps['train']; print(s.status.value, s.end_time is not None)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["stopped", "True"], out.stderr


# -- sqlite3 errors are StoreErrors naming the file and the operation ------------------------

_bodies_run: list[str] = []


@step(enable_cache=False)
def marker() -> int:
    _bodies_run.append("marker")
    return 1


@pipeline
def marked() -> None:
    marker()


def test_a_garbage_database_file_fails_a_run_before_any_step(tmp_path: Path) -> None:
    """A run on a stack whose database file holds garbage raises StoreError naming the file and
    the operation, and no step body runs."""
    (tmp_path / "flowcore.db").write_bytes(bytes(range(256)) * 64)
    _bodies_run.clear()
    with pytest.raises(StoreError) as info:
        marked.with_options(stack=Stack.local(tmp_path))()
    assert str(tmp_path / "flowcore.db") in str(info.value)
    assert "(opening)" in str(info.value) and "not a usable" in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert _bodies_run == []


def test_a_damaged_page_met_while_reading_is_a_store_error_naming_the_read(tmp_path: Path) -> None:
    """A database that opens but whose run-name index is damaged raises StoreError from the
    client's read, naming the file and the operation."""
    marked.with_options(stack=Stack.local(tmp_path), run_name="fine")()
    db_path = tmp_path / "flowcore.db"
    with sqlite3.connect(db_path) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = raw.execute("PRAGMA page_size").fetchone()[0]
        (root,) = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs_name'"
                              ).fetchone()
    raw.close()
    with open(db_path, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)
    with pytest.raises(StoreError) as info:
        Client(Stack.local(tmp_path)).get_pipeline_run("fine")
    assert str(db_path) in str(info.value) and "(reading)" in str(info.value)


# -- one connection per event loop, closed with the loop -------------------------------------


def _threads_and_fds() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def _assert_flat(before: tuple[int, int], slack: int = 2) -> None:
    threads, fds = _threads_and_fds()
    assert threads <= before[0] + slack and fds <= before[1] + 2 * slack, (before, (threads, fds))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open fds in /proc")
def test_each_asyncio_run_closes_its_connection_at_loop_shutdown(tmp_path: Path) -> None:
    """Fifty `asyncio.run(p.run())` calls on one local stack leave thread and fd counts flat:
    the connection opened on each loop is closed when that loop shuts down."""
    run = marked.with_options(stack=Stack.local(tmp_path))
    asyncio.run(run.run())  # the first run starts process-wide pools
    before = _threads_and_fds()
    for _ in range(50):
        asyncio.run(run.run())
    _assert_flat(before)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open fds in /proc")
def test_a_stack_moves_between_loops_and_closes_without_leaking(tmp_path: Path) -> None:
    """A stack used on one loop keeps working on the next ones (asyncio.run, asyncio.Runner with
    several runs on one loop, a plain call), `Stack.close()` included, and nothing leaks."""
    stack = Stack.local(tmp_path)
    run = marked.with_options(stack=stack)
    asyncio.run(run.run())
    before = _threads_and_fds()

    async def run_close_run() -> int:
        await run.run()
        await stack.close()  # closes this loop's store; the next use opens it again
        await run.run()
        return len(await AsyncClient(stack).list_pipeline_runs(limit=1000))

    for round_ in range(10):
        assert asyncio.run(run_close_run()) == 1 + 4 * round_ + 2
        with asyncio.Runner() as runner:
            for _ in range(2):
                runner.run(run.run())
            _assert_flat(before, slack=3)  # this loop's connection is still open
        _assert_flat(before)
    run()
    assert len(Client(stack).list_pipeline_runs(limit=1000)) == 1 + 4 * 10 + 1
    _assert_flat(before)


async def test_a_postgres_batch_cancelled_as_it_finishes_still_settles_its_writers() -> None:
    """The Postgres writer awaits a sent batch through cancellations; one that arrives just as
    the batch finishes must still hand back the batch's outcome (raising instead left every
    other writer of that batch waiting forever: 300 concurrent runs hung one time in three)."""
    from flowcore.stores._postgres_writer import _finish

    loop = asyncio.get_running_loop()
    release: asyncio.Future[None] = loop.create_future()

    async def batch() -> list[str]:
        await release
        return ["committed"]

    task = asyncio.ensure_future(batch())
    waiter = asyncio.ensure_future(_finish(task))
    await asyncio.sleep(0)  # the waiter now awaits the batch
    release.set_result(None)
    await task  # the batch is done; the waiter has not resumed yet
    waiter.cancel()
    outcome, cancelled = await waiter
    assert outcome == ["committed"]
    assert isinstance(cancelled, asyncio.CancelledError)
