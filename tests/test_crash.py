"""A run whose process is SIGKILLed mid-run: it is found CRASHED later, and a re-run reuses every
step that had completed; on SQLite + local files and on Postgres + S3 (where the crash is told by
the lapsed heartbeat alone)."""

import asyncio
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import flowcore
from flowcore import Client, RunStatus, Stack, StepStatus

REPO = Path(__file__).resolve().parents[1]

CRASH_SCRIPT = '''
import json, os, sys, time
import flowcore
from flowcore import Stack, pipeline, step


def mark(name):
    with open(os.path.join(os.environ["MARKS"], name), "a") as f:
        f.write(f"{os.getpid()}\\n")


@step
def s1() -> int:
    mark("s1")
    return 1


@step
def s2(x: int) -> int:
    mark("s2")
    return x + 1


@step
def s3(x: int) -> int:
    mark("s3")
    return x + 1


@step
def s4(x: int) -> int:
    mark("s4")
    if os.environ.get("SLOW") == "1":
        time.sleep(600)
    return x + 1


@step
def s5(x: int) -> int:
    mark("s5")
    return x * 10


@pipeline
def crashy():
    s5(s4(s3(s2(s1()))))


if __name__ == "__main__":
    flowcore.set_active_stack(Stack.from_urls(
        metadata=os.environ["STACK_METADATA"], artifacts=os.environ["STACK_ARTIFACTS"],
        storage_options=json.loads(os.environ["STACK_OPTIONS"]) or None))
    run = crashy.with_options(run_name=sys.argv[1])()
    print(run.status.value, " ".join(f"{k}={s.status.value}" for k, s in run.steps.items()))
'''

STEPS = ["s1", "s2", "s3", "s4", "s5"]


HEARTBEAT_TIMEOUT = 1.5  # Postgres: how long a killed run's heartbeat takes to lapse


class Crash:
    """One crash scenario: the stores (SQLite + local files, or Postgres + S3), the marker
    directory and the script."""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest | None = None) -> None:
        self.kind = getattr(request, "param", "sqlite")
        self.stack_path = tmp_path / "stack"
        if self.kind == "sqlite":
            self.metadata, self.artifacts = str(self.stack_path), str(self.stack_path / "artifacts")
            self.options: dict[str, Any] = {}
        else:
            assert request is not None
            shared = request.getfixturevalue("shared_stores")
            self.metadata = f"{shared.metadata}?heartbeat_timeout={HEARTBEAT_TIMEOUT}"
            self.artifacts, self.options = shared.artifacts, shared.storage_options
        self.marks = tmp_path / "marks"
        self.marks.mkdir()
        self.script = tmp_path / "crash_pipeline.py"
        self.script.write_text(CRASH_SCRIPT)

    def stack(self) -> Stack:
        """A new stack on the scenario's stores."""
        return Stack.from_urls(metadata=self.metadata, artifacts=self.artifacts,
                               storage_options=self.options or None)

    def lapse(self) -> None:
        """Wait until a killed run's heartbeat has lapsed (nothing to wait for on SQLite,
        where the dead pid tells at once)."""
        if self.kind != "sqlite":
            time.sleep(HEARTBEAT_TIMEOUT + 0.5)

    def env(self, slow: bool) -> dict[str, str]:
        return {**os.environ, "STACK_METADATA": self.metadata, "STACK_ARTIFACTS": self.artifacts,
                "STACK_OPTIONS": json.dumps(self.options), "MARKS": str(self.marks),
                "SLOW": "1" if slow else "0", "PYTHONPATH": str(REPO)}

    def runs_of(self, step_name: str) -> int:
        """How many times a step body has started (over every process)."""
        path = self.marks / step_name
        return len(path.read_text().splitlines()) if path.exists() else 0

    def start_and_kill(self, run_name: str) -> None:
        """Start the pipeline in a subprocess, wait until s4 is running, SIGKILL the process."""
        proc = subprocess.Popen([sys.executable, str(self.script), run_name],
                                env=self.env(slow=True), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 90
            while not (self.marks / "s4").exists():
                if proc.poll() is not None:
                    out, err = proc.communicate()
                    pytest.fail(f"the pipeline process ended early ({proc.returncode}): {out}{err}")
                if time.monotonic() > deadline:
                    pytest.fail("step s4 never started")
                time.sleep(0.05)
            # s4 writes its marker as it starts; give its RUNNING row a moment to be committed.
            time.sleep(0.3)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)  # reap it, so its pid is really gone
        assert proc.returncode == -signal.SIGKILL

    def rerun_in_subprocess(self, run_name: str) -> str:
        proc = subprocess.run([sys.executable, str(self.script), run_name],
                              env=self.env(slow=False), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def raw_run_status(self, run_name: str) -> str:
        """The run's status as stored, read without flowcore (which would mark crashes)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.stack_path / "flowcore.db") as db:
                row = db.execute("SELECT status FROM runs WHERE name = ?", (run_name,)).fetchone()
        else:
            row = asyncio.run(_postgres_row(self.metadata.split("?")[0],
                                            "SELECT status FROM runs WHERE name = $1", run_name))
        assert row is not None, f"no run {run_name!r} stored"
        return str(row[0])


async def _postgres_row(url: str, query: str, *args: Any) -> Any:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchrow(query, *args)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres+s3"])
def crash(request: pytest.FixtureRequest, tmp_path: Path) -> Crash:
    """A crash scenario on each durable pair of stores."""
    return Crash(tmp_path, request)


def _load_script_module(crash: Crash, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Import the crash script in this process (its steps have the same source)."""
    spec = importlib.util.spec_from_file_location("crash_pipeline", crash.script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "crash_pipeline", module)
    spec.loader.exec_module(module)
    return module


def test_killed_run_reads_crashed_and_rerun_reuses_completed_steps(
    crash: Crash, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After SIGKILL mid-step, the store opens, the client reads the run CRASHED, and an
    in-process re-run reuses s1..s3 (CACHED) and runs s4 and s5."""
    crash.start_and_kill("doomed")
    assert [crash.runs_of(s) for s in STEPS] == [1, 1, 1, 1, 0]
    assert crash.raw_run_status("doomed") == "running"

    if crash.kind == "sqlite":
        with sqlite3.connect(crash.stack_path / "flowcore.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    crash.lapse()
    stack = crash.stack()
    run = Client(stack).get_pipeline_run("doomed")
    assert run.status is RunStatus.CRASHED
    assert {k: run.steps[k].status for k in ("s1", "s2", "s3")} == {
        "s1": StepStatus.COMPLETED, "s2": StepStatus.COMPLETED, "s3": StepStatus.COMPLETED}
    assert run.steps["s3"].output.load() == 3
    assert run.end_time is not None and run.end_time >= run.start_time
    assert Client(stack).list_pipeline_runs(status=RunStatus.CRASHED)[0].name == "doomed"
    assert crash.raw_run_status("doomed") == "crashed"

    module = _load_script_module(crash, monkeypatch)
    monkeypatch.setenv("MARKS", str(crash.marks))
    monkeypatch.setenv("SLOW", "0")
    flowcore.set_active_stack(stack)
    rerun = module.crashy.with_options(run_name="recovery")()
    assert rerun.status is RunStatus.COMPLETED
    assert {k: s.status for k, s in rerun.steps.items()} == {
        "s1": StepStatus.CACHED, "s2": StepStatus.CACHED, "s3": StepStatus.CACHED,
        "s4": StepStatus.COMPLETED, "s5": StepStatus.COMPLETED}
    assert rerun.steps["s5"].output.load() == 40
    assert [crash.runs_of(s) for s in STEPS] == [1, 1, 1, 2, 1]
    assert Client(stack).get_pipeline_run("doomed").status is RunStatus.CRASHED


def test_next_run_on_the_store_marks_an_orphaned_run_crashed(crash: Crash) -> None:
    """A second run in another process marks the killed run CRASHED by itself (no client
    involved) and reuses its completed steps."""
    crash.start_and_kill("orphan")
    assert crash.raw_run_status("orphan") == "running"
    crash.lapse()

    out = crash.rerun_in_subprocess("successor")
    assert out == ("completed s1=cached s2=cached s3=cached s4=completed s5=completed"), out
    assert crash.raw_run_status("orphan") == "crashed"
    assert crash.raw_run_status("successor") == "completed"
    assert [crash.runs_of(s) for s in STEPS] == [1, 1, 1, 2, 1]


def test_steps_of_a_crashed_run_are_not_left_running(crash: Crash) -> None:
    """Once a run is found CRASHED, none of its steps still reads RUNNING or PENDING (nothing
    runs them any more; fine point 9 shows RUNNING only while a step is)."""
    crash.start_and_kill("halted")
    crash.lapse()
    run = Client(crash.stack()).get_pipeline_run("halted")
    assert run.status is RunStatus.CRASHED
    assert run.steps["s1"].status is StepStatus.COMPLETED
    left = {k: s.status for k, s in run.steps.items()
            if s.status in (StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.PENDING)}
    assert left == {}
