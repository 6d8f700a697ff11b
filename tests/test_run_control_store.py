"""Run control in the metadata stores (API.md §14-16): the new run and step fields, cancel
requests, run liveness, pool leases, and the one serving writer, on both stacks, with real
subprocesses where another process is involved."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

import flowcore
from flowcore import Client, RunStatus, Stack, StepStatus, pipeline, step
from flowcore._models import PipelineRun, StepRun, StepRunConfig
from flowcore.stores._base import MetadataStore
from flowcore.stores._local import LocalArtifactStore
from flowcore.stores._sqlite import SqliteMetadataStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["memory", "local"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Stack:
    """Both stacks a user has."""
    return Stack.in_memory() if request.param == "memory" else Stack.local(tmp_path / "stack")


def make_run(name: str, steps: tuple[str, ...] = ("load", "train")) -> PipelineRun:
    run = PipelineRun(id=uuid.uuid4().hex, name=name, pipeline_name="training",
                      start_time=datetime.now(UTC))
    for s in steps:
        run.steps[s] = StepRun(id=uuid.uuid4().hex, name=s, step_name=s, pipeline_run_id=run.id,
                               config=StepRunConfig())
    return run


async def finish(store: MetadataStore, run: PipelineRun, status: RunStatus) -> None:
    for sr in run.steps.values():
        sr.status = StepStatus.COMPLETED
        await store.update_step_run(run, sr)
    run.status = status
    run.end_time = datetime.now(UTC)
    await store.update_run(run)


# -- fields ----------------------------------------------------------------------------------

async def test_resumed_from_source_and_waited_are_stored(stack: Stack) -> None:
    """resumed_from, source and StepRun.waited read back as written, on both stores."""
    store = await stack.metadata_store()
    run = make_run("r-fields")
    run.resumed_from = "original-id"
    run.source = "my_project.flows:training"
    await store.create_run(run)
    run.steps["load"].waited = 1.25
    run.steps["load"].status = StepStatus.RUNNING
    store.record_step_run(run, run.steps["load"])
    await store.flush()
    await stack.close()

    back = await (await stack.metadata_store()).get_run("r-fields")
    assert (back.resumed_from, back.source) == ("original-id", "my_project.flows:training")
    assert back.steps["load"].waited == 1.25
    assert back.steps["train"].waited == 0.0


# -- cancel requests -------------------------------------------------------------------------

async def test_cancelling_a_finished_run_changes_nothing(stack: Stack) -> None:
    """request_cancel of a finished run returns its status and leaves the record as it was."""
    store = await stack.metadata_store()
    run = make_run("r-done")
    await store.create_run(run)
    await finish(store, run, RunStatus.COMPLETED)
    assert await store.request_cancel("r-done", drain=False) is RunStatus.COMPLETED
    back = await store.get_run(run.id)
    assert back.status is RunStatus.COMPLETED
    assert {s.status for s in back.steps.values()} == {StepStatus.COMPLETED}
    assert not await store.run_is_live(run.id)


async def test_a_watched_run_is_told_once_with_drain(stack: Stack) -> None:
    """A request for a watched RUNNING run reaches its watcher within about a second, once,
    with the drain flag; the run is live meanwhile."""
    store = await stack.metadata_store()
    run = make_run("r-watched")
    await store.create_run(run)
    calls: list[bool] = []
    heard = asyncio.Event()

    def stop(drain: bool) -> None:
        calls.append(drain)
        heard.set()

    store.watch_cancels(run.id, stop)
    writer = asyncio.create_task(store.serve_writes())
    try:
        assert await store.run_is_live(run.id)
        started = time.monotonic()
        assert await store.request_cancel("r-watched", drain=True) is RunStatus.RUNNING
        await asyncio.wait_for(heard.wait(), 3)
        assert time.monotonic() - started < 2.0
        await asyncio.sleep(1.5)  # a few more writer ticks: the request is not delivered again
        assert calls == [True]
    finally:
        store.unwatch_cancels(run.id)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    await finish(store, run, RunStatus.STOPPED)


async def test_a_request_made_before_the_watch_is_delivered_when_it_starts(stack: Stack) -> None:
    """A cancel asked between a run's record and its watch is not lost."""
    store = await stack.metadata_store()
    run = make_run("r-early")
    await store.create_run(run)
    assert await store.request_cancel(run.id, drain=False) is RunStatus.RUNNING
    heard: list[bool] = []
    store.watch_cancels(run.id, heard.append)
    writer = asyncio.create_task(store.serve_writes())
    try:
        for _ in range(40):
            if heard:
                break
            await asyncio.sleep(0.05)
        assert heard == [False]
    finally:
        store.unwatch_cancels(run.id)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    await finish(store, run, RunStatus.STOPPED)


async def test_no_writer_tick_while_nothing_is_watched(tmp_path: Path) -> None:
    """The serving writer sleeps until a write arrives when no run is watched (no polling)."""
    local = Stack.local(tmp_path)  # kept: the stack owns its per-loop store
    store = await local.metadata_store()
    assert isinstance(store, SqliteMetadataStore)
    writer = asyncio.create_task(store.serve_writes())
    await asyncio.sleep(0.1)
    before = store.writer_wakeups
    await asyncio.sleep(2.5)
    assert store.writer_wakeups == before
    run = make_run("r-tick")
    await store.create_run(run)
    store.watch_cancels(run.id, lambda drain: None)
    await asyncio.sleep(2.5)
    assert store.writer_wakeups - before >= 2  # now it looks about once a second
    store.unwatch_cancels(run.id)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)


# -- a run whose process is gone ---------------------------------------------------------

HOLDER = textwrap.dedent('''
    import asyncio, os, sys, uuid
    from datetime import UTC, datetime
    from flowcore import Stack
    from flowcore._models import PipelineRun, StepRun, StepRunConfig, StepStatus

    async def main():
        stack = Stack.local(os.environ["STACK_PATH"])  # kept: it owns the store
        store = await stack.metadata_store()
        if sys.argv[1] == "run":
            run = PipelineRun(id=uuid.uuid4().hex, name=sys.argv[2], pipeline_name="held",
                              start_time=datetime.now(UTC))
            for name in ("a", "b"):
                run.steps[name] = StepRun(id=uuid.uuid4().hex, name=name, step_name=name,
                                          pipeline_run_id=run.id, config=StepRunConfig())
            await store.create_run(run)
            run.steps["a"].status = StepStatus.RUNNING
            await store.update_step_run(run, run.steps["a"])
        else:
            assert await store.acquire_slot("gpu", 1, "holder-" + str(os.getpid()))
        print("ready", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
''')


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Start helper processes (a run or a lease holder) on Stack.local(tmp_path/stack)."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def start(procs: list[subprocess.Popen[str]], tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "STACK_PATH": str(tmp_path / "stack"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)  # reaped: its pid is really gone


async def test_cancel_of_a_run_whose_process_was_killed_marks_it_crashed_at_once(
    tmp_path: Path, holder: list[subprocess.Popen[str]],
) -> None:
    """An open store asked to cancel the run of a SIGKILLed process marks it CRASHED at once:
    its running step STOPPED, its pending step SKIPPED."""
    proc = start(holder, tmp_path, "run", "r-killed")
    local = Stack.local(tmp_path / "stack")
    store = await local.metadata_store()  # opened while it lives
    assert await store.run_is_live("r-killed")
    kill(proc)
    assert not await store.run_is_live("r-killed")
    assert await store.request_cancel("r-killed", drain=False) is RunStatus.CRASHED
    back = await store.get_run("r-killed")
    assert back.status is RunStatus.CRASHED
    assert (back.steps["a"].status, back.steps["b"].status) == (StepStatus.STOPPED,
                                                                StepStatus.SKIPPED)


def test_client_cancel_of_a_killed_run_gives_crashed(
    tmp_path: Path, holder: list[subprocess.Popen[str]],
) -> None:
    """Client.cancel_run on the name of a SIGKILLed run returns CRASHED without waiting."""
    kill(start(holder, tmp_path, "run", "r-killed-2"))
    started = time.monotonic()
    assert Client(Stack.local(tmp_path / "stack")).cancel_run("r-killed-2") is RunStatus.CRASHED
    assert time.monotonic() - started < 5


# -- pool leases -----------------------------------------------------------------------------

async def test_slots_are_limited_and_given_back(stack: Stack) -> None:
    """acquire_slot grants at most `limit` holders; taking again is true; release frees one."""
    store = await stack.metadata_store()
    assert await store.acquire_slot("gpu", 2, "h1")
    assert await store.acquire_slot("gpu", 2, "h2")
    assert not await store.acquire_slot("gpu", 2, "h3")
    assert await store.acquire_slot("gpu", 2, "h1")  # already held
    assert await store.acquire_slot("cpu", 1, "h3")  # another pool
    await store.release_slot("gpu", "h1")
    assert await store.acquire_slot("gpu", 2, "h3")
    await store.release_slot("gpu", "nobody")  # nothing held: nothing happens


async def test_a_killed_holders_slot_is_free_within_ten_seconds(
    tmp_path: Path, holder: list[subprocess.Popen[str]],
) -> None:
    """A lease taken by a process that is then SIGKILLed stops counting within ~10 s."""
    proc = start(holder, tmp_path, "lease")
    local = Stack.local(tmp_path / "stack")
    store = await local.metadata_store()
    assert not await store.acquire_slot("gpu", 1, "me")
    kill(proc)
    deadline = time.monotonic() + 11
    while not await store.acquire_slot("gpu", 1, "me"):
        assert time.monotonic() < deadline, "the killed holder's lease never lapsed"
        await asyncio.sleep(0.25)


async def test_a_lease_nobody_renews_lapses_and_renewal_keeps_it(
    tmp_path: Path, holder: list[subprocess.Popen[str]],
) -> None:
    """A live process that stops renewing loses its lease ~10 s later; a store whose writer
    runs keeps renewing its own."""
    start(holder, tmp_path, "lease")  # alive, but runs no writer: nothing renews its lease
    local = Stack.local(tmp_path / "stack")
    store = await local.metadata_store()
    assert isinstance(store, SqliteMetadataStore)
    writer = asyncio.create_task(store.serve_writes())
    try:
        assert await store.acquire_slot("cpu", 1, "mine")
        started = time.monotonic()
        while not await store.acquire_slot("gpu", 1, "me"):
            assert time.monotonic() - started < 12, "an unrenewed lease never lapsed"
            await asyncio.sleep(0.25)
        assert time.monotonic() - started > 5  # lapsed by expiry, not at once
        other = SqliteMetadataStore(store.path, store.artifact_store)
        try:
            # Our own lease, taken ~10 s ago, is still held: the writer renewed it.
            assert not await other.acquire_slot("cpu", 1, "someone-else")
        finally:
            await other.close()
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


# -- the serving writer ----------------------------------------------------------------------

@step(enable_cache=False)
def tiny(x: int) -> int:
    return x + 1


@pipeline(enable_cache=False)
def two_tiny(x: int) -> None:
    tiny(tiny(x))


async def test_a_burst_of_runs_wakes_one_writer_per_commit(tmp_path: Path) -> None:
    """500 concurrent two-step runs on one local stack: the writer tasks resume about once
    per commit, not once per run per commit."""
    stack = Stack.local(tmp_path)
    flowcore.set_active_stack(stack)
    store = await stack.metadata_store()
    assert isinstance(store, SqliteMetadataStore)
    runs = await asyncio.gather(*(two_tiny.run(i) for i in range(500)))
    assert {r.status for r in runs} == {RunStatus.COMPLETED}
    assert store.commits > 0
    # Before the hand-over, every queued write woke all 500 writer tasks (~80,000 wake-ups).
    assert store.writer_wakeups <= 2 * store.commits + 50, (store.writer_wakeups, store.commits)


async def test_flush_waits_for_its_own_writes_not_for_a_busy_queue(tmp_path: Path) -> None:
    """flush() returns once the writes queued before it are committed, while another task
    keeps queueing writes without pause."""
    local = Stack.local(tmp_path)  # kept: the stack owns its per-loop store
    store = await local.metadata_store()
    run = make_run("r-busy", steps=tuple(f"s{i}" for i in range(50)))
    await store.create_run(run)
    stop = asyncio.Event()

    async def busy() -> None:
        i = 0
        give_up = time.monotonic() + 3  # without the fix flush() returns only after this
        while not stop.is_set() and time.monotonic() < give_up:
            sr = run.steps[f"s{i % 50}"]
            sr.attempts += 1
            store.record_step_run(run, sr)  # the queue never empties while this runs
            i += 1
            # A writer that never sleeps would starve the store's thread of the GIL (each
            # statement waits a switch interval): keep the loop busy, not saturated.
            await asyncio.sleep(0.0005)

    tasks = [asyncio.create_task(busy()) for _ in range(3)]
    try:
        await asyncio.sleep(0.3)
        run.steps["s0"].status = StepStatus.RUNNING
        store.record_step_run(run, run.steps["s0"])
        started = time.monotonic()
        await asyncio.wait_for(store.flush(), 5)
        assert time.monotonic() - started < 1.0
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    await store.flush()
    assert (await store.get_run(run.id)).steps["s0"].status is StepStatus.RUNNING


# -- cancel from another process, end to end ------------------------------------------------

RUNNER = textwrap.dedent('''
    import asyncio, os, sys
    from pathlib import Path
    import flowcore
    from flowcore import Stack, pipeline, step

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
        flowcore.set_active_stack(Stack.local(os.environ["STACK_PATH"]))
        run = long_run.with_options(run_name=sys.argv[1])()
        print(run.status.value, flush=True)
''')


def run_elsewhere(tmp_path: Path, name: str, slow: float) -> subprocess.Popen[str]:
    """Start `long_run` in another process and return once its slow step has started."""
    script, mark = tmp_path / "runner.py", tmp_path / f"{name}.started"
    script.write_text(RUNNER)
    env = {**os.environ, "STACK_PATH": str(tmp_path / "stack"), "PYTHONPATH": str(REPO),
           "MARK": str(mark), "SLOW": str(slow)}
    proc = subprocess.Popen([sys.executable, str(script), name], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not mark.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never started: {proc.communicate()}")
        time.sleep(0.05)
    time.sleep(0.3)  # let its RUNNING rows be committed
    return proc


def test_cancel_from_another_process_stops_the_run(tmp_path: Path) -> None:
    """Client.cancel_run in this process stops a run of another process within a few
    seconds: its running step STOPPED, the next SKIPPED, the run STOPPED."""
    proc = run_elsewhere(tmp_path, "far", slow=60)
    try:
        started = time.monotonic()
        status = Client(Stack.local(tmp_path / "stack")).cancel_run("far")
        assert status is RunStatus.STOPPED
        assert time.monotonic() - started < 5
        out, err = proc.communicate(timeout=30)
        assert out.strip() == "stopped", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    run = Client(Stack.local(tmp_path / "stack")).get_pipeline_run("far")
    assert (run.steps["slow"].status, run.steps["after"].status) == (StepStatus.STOPPED,
                                                                     StepStatus.SKIPPED)


def test_cancel_with_drain_from_another_process_lets_the_running_step_finish(
    tmp_path: Path,
) -> None:
    """With drain, the running step of the other process's run COMPLETES, the next is
    SKIPPED and the run ends STOPPED."""
    proc = run_elsewhere(tmp_path, "far-drain", slow=3)
    try:
        status = Client(Stack.local(tmp_path / "stack")).cancel_run("far-drain", drain=True)
        assert status is RunStatus.STOPPED
        out, err = proc.communicate(timeout=30)
        assert out.strip() == "stopped", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    run = Client(Stack.local(tmp_path / "stack")).get_pipeline_run("far-drain")
    assert (run.steps["slow"].status, run.steps["after"].status) == (StepStatus.COMPLETED,
                                                                     StepStatus.SKIPPED)


async def test_cancel_of_a_run_live_in_this_process(stack: Stack) -> None:
    """AsyncClient.cancel_run on a run this process runs stops it directly (both stacks)."""
    from flowcore import AsyncClient

    gate = asyncio.Event()

    @step(enable_cache=False)
    async def waits() -> int:
        gate.set()
        await asyncio.sleep(60)
        return 1

    @pipeline(enable_cache=False)
    def here() -> None:
        waits()

    handle = here.with_options(stack=stack, run_name="here").submit()
    await asyncio.wait_for(gate.wait(), 10)
    assert await AsyncClient(stack).cancel_run("here") is RunStatus.STOPPED
    run = await handle
    assert run.status is RunStatus.STOPPED
    assert await AsyncClient(stack).cancel_run("here") is RunStatus.STOPPED  # finished: as is


async def test_a_request_merged_while_the_older_one_is_delivered_is_not_dropped(
    tmp_path: Path,
) -> None:
    """A stop asked after a drain request was read but before it was dropped survives the
    drop (it is a new request) and is delivered next."""
    import sqlite3

    from flowcore.stores import _sqlite_control as control

    store = SqliteMetadataStore(tmp_path / "flowcore.db", LocalArtifactStore(tmp_path / "a"))
    await store.open()
    try:
        run = make_run("r-merged")
        await store.create_run(run)
        assert await store.request_cancel(run.id, drain=True) is RunStatus.RUNNING
        with sqlite3.connect(tmp_path / "flowcore.db") as db:
            db.row_factory = sqlite3.Row
            taken = control.pending_cancels(db, [run.id])
        assert [(r, d) for r, d, _ in taken] == [(run.id, True)]
        await asyncio.sleep(0.01)  # a later request time
        assert await store.request_cancel(run.id, drain=False) is RunStatus.RUNNING
        with sqlite3.connect(tmp_path / "flowcore.db") as db:
            db.row_factory = sqlite3.Row
            control.drop_cancels(db, taken)
            left = control.pending_cancels(db, [run.id])
        assert [(r, d) for r, d, _ in left] == [(run.id, False)]
        await finish(store, run, RunStatus.STOPPED)
    finally:
        await store.close()
