"""Several processes running pipelines on one store (SQLite + local files, or Postgres + S3): no
lost rows, no lock errors, one winner per run name, and status changes visible from another
process while a run goes on."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flowcore import Client, PipelineRun, RunStatus, Stack, StepStatus

REPO = Path(__file__).resolve().parents[1]

COMMON = '''
import asyncio, json, logging, os, sys, time
import flowcore
from flowcore import Stack, StepRetryConfig, pipeline, step, unmapped

flowcore.enable_console_logging(logging.WARNING)
flowcore.set_active_stack(Stack.from_urls(
    metadata=os.environ["STACK_METADATA"], artifacts=os.environ["STACK_ARTIFACTS"],
    storage_options=json.loads(os.environ["STACK_OPTIONS"]) or None))
MARKS = os.environ["MARKS"]


def mark(name):
    with open(os.path.join(MARKS, name), "a") as f:
        f.write(f"{os.getpid()}\\n")


def wait_for(name, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(MARKS, name)):
        if time.monotonic() > deadline:
            raise TimeoutError(name)
        time.sleep(0.02)
'''

BUSY = COMMON + '''
TAG = sys.argv[1]
ROUNDS, PER_ROUND = int(sys.argv[2]), int(sys.argv[3])


@step
def shared_setup(n: int) -> list[int]:
    # The same cache key in every process: concurrent cache writes of one key.
    return list(range(n))


@step(enable_cache=False)
def work(base: list[int], k: int, tag: str) -> int:
    return sum(base) * k


@step(enable_cache=False)
def square(x: int, tag: str) -> int:
    return x * x


@step(enable_cache=False)
def total(parts: list[int], squares: list[int]) -> int:
    return sum(parts) + sum(squares)


@pipeline
def busy(tag: str = "", i: int = 0):
    base = shared_setup(4)
    parts = [work(base, k, tag, step_name=f"work_{k}") for k in range(6)]
    total(parts, square.map(base, unmapped(f"{tag}-{i}")))


async def main():
    mark("ready-" + TAG)
    wait_for("go")
    for r in range(ROUNDS):
        runs = await asyncio.gather(*(
            busy.with_options(run_name=f"{TAG}-{r}-{j}").run(tag=TAG, i=j)
            for j in range(PER_ROUND)))
        assert all(run.status.value == "completed" for run in runs), runs
    print("done")

asyncio.run(main())
'''

RACE = COMMON + '''
TAG = sys.argv[1]


@step(enable_cache=False)
def claim() -> str:
    mark("claimed-" + os.environ["TAG"])
    time.sleep(1.0)
    return os.environ["TAG"]


@pipeline
def contested_pipeline():
    claim()


mark("ready-" + TAG)
wait_for("go")
run = contested_pipeline.with_options(run_name="contested")()
print("won", run.status.value)
'''

WATCHED = COMMON + '''
@step(enable_cache=False)
def prepare() -> int:
    return 3


@step(enable_cache=False)
def blocker(x: int) -> int:
    mark("blocking")
    wait_for("release")
    return x + 1


@step(enable_cache=False, retry=StepRetryConfig(max_retries=1, delay=float(os.environ["DELAY"])))
def flaky() -> int:
    mark("flaky-attempt")
    if len(open(os.path.join(MARKS, "flaky-attempt")).read().splitlines()) == 1:
        raise ConnectionError("first attempt fails")
    return 7


@pipeline
def watched(with_flaky: bool = False):
    blocker(prepare())
    if with_flaky:
        flaky()


run = watched.with_options(run_name=sys.argv[1])(with_flaky=sys.argv[2] == "1")
print(run.status.value)
'''


class Workspace:
    """The shared stores, a marker directory and the scripts' environment."""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.tmp = tmp_path
        if request.param == "sqlite":
            stack_path = tmp_path / "stack"
            self.metadata, self.artifacts = str(stack_path), str(stack_path / "artifacts")
            self.options: dict[str, Any] = {}
        else:
            shared = request.getfixturevalue("shared_stores")
            self.metadata, self.artifacts = shared.metadata, shared.artifacts
            self.options = shared.storage_options
        self.marks = tmp_path / "marks"
        self.marks.mkdir()

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "STACK_METADATA": self.metadata, "STACK_ARTIFACTS": self.artifacts,
                "STACK_OPTIONS": json.dumps(self.options), "MARKS": str(self.marks),
                "PYTHONPATH": str(REPO), **extra}

    def spawn(self, name: str, source: str, *args: str, **env: str) -> subprocess.Popen[str]:
        script = self.tmp / f"{name}.py"
        if not script.exists():
            script.write_text(source)
        return subprocess.Popen([sys.executable, str(script), *args], env=self.env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for_marks(self, names: list[str], procs: list[subprocess.Popen[str]],
                       timeout: float = 90.0) -> None:
        """Poll for marker files while the processes are alive."""
        deadline = time.monotonic() + timeout
        while not all((self.marks / n).exists() for n in names):
            for p in procs:
                if p.poll() is not None:
                    out, err = p.communicate()
                    pytest.fail(f"process ended early ({p.returncode}): {out}\n{err}")
            if time.monotonic() > deadline:
                pytest.fail(f"markers never appeared: {names}")
            time.sleep(0.02)

    def client(self) -> Client:
        return Client(Stack.from_urls(metadata=self.metadata, artifacts=self.artifacts,
                                      storage_options=self.options or None))


@pytest.fixture(params=["sqlite", "postgres+s3"])
def ws(request: pytest.FixtureRequest, tmp_path: Path) -> Workspace:
    """A workspace on each durable pair of stores."""
    return Workspace(tmp_path, request)


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 120.0) -> list[tuple[int, str, str]]:
    """Wait for every process; SIGKILL the ones still running at the deadline."""
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            out, err = p.communicate()
        results.append((p.returncode, out, err))
    return results


# -- four busy processes --------------------------------------------------------------------

ROUNDS, PER_ROUND, WORKERS = 2, 3, 4
STEPS_PER_RUN = 1 + 6 + 1 + 1 + 4  # shared_setup, work_0..5, total, square, square[0..3]


def test_four_processes_running_pipelines_lose_nothing(ws: Workspace) -> None:
    """Four processes, each running concurrent fan-out runs on one SQLite store, all succeed
    with no 'database is locked', and every run and step row is stored."""
    tags = [f"w{i}" for i in range(WORKERS)]
    procs = [ws.spawn("busy", BUSY, tag, str(ROUNDS), str(PER_ROUND)) for tag in tags]
    try:
        ws.wait_for_marks([f"ready-{t}" for t in tags], procs)
    finally:
        (ws.marks / "go").touch()  # release every worker at once
    results = _finish(procs)
    for code, out, err in results:
        assert code == 0, err
        assert out.strip() == "done", out + err
        assert "locked" not in out + err
        assert "Traceback" not in err

    client = ws.client()
    runs = client.list_pipeline_runs(pipeline_name="busy", limit=1000)
    expected = {f"{t}-{r}-{j}" for t in tags for r in range(ROUNDS) for j in range(PER_ROUND)}
    assert {r.name for r in runs} == expected
    assert len(runs) == len(expected)
    assert {r.status for r in runs} == {RunStatus.COMPLETED}
    step_rows = 0
    for listed in runs:
        run = client.get_pipeline_run(listed.name)
        assert len(run.steps) == STEPS_PER_RUN, run.steps
        assert all(s.status in (StepStatus.COMPLETED, StepStatus.CACHED)
                   for s in run.steps.values()), run
        assert run.steps["total"].output.load() == sum(6 * k for k in range(6)) + 0 + 1 + 4 + 9
        step_rows += len(run.steps)
    assert step_rows == len(expected) * STEPS_PER_RUN
    setups = [client.get_pipeline_run(r.name).steps["shared_setup"].status for r in runs]
    assert StepStatus.CACHED in setups


# -- racing for one run name ----------------------------------------------------------------


def test_two_processes_racing_for_one_run_name(ws: Workspace) -> None:
    """Of two processes starting a run with the same explicit name at once, exactly one runs;
    the other fails with RunNameConflictError before any of its steps ran."""
    procs = [ws.spawn("race", RACE, tag, TAG=tag) for tag in ("left", "right")]
    try:
        ws.wait_for_marks(["ready-left", "ready-right"], procs)
    finally:
        (ws.marks / "go").touch()
    results = dict(zip(("left", "right"), _finish(procs), strict=True))
    winners = [t for t, (code, _, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    winner = winners[0]
    loser = "right" if winner == "left" else "left"
    assert results[winner][1].strip() == "won completed"
    code, _, err = results[loser]
    assert code != 0
    assert "RunNameConflictError" in err, err
    assert "contested" in err
    assert (ws.marks / f"claimed-{winner}").exists()
    assert not (ws.marks / f"claimed-{loser}").exists()

    runs = ws.client().list_pipeline_runs()
    assert [(r.name, r.status) for r in runs] == [("contested", RunStatus.COMPLETED)]
    assert ws.client().get_pipeline_run("contested").steps["claim"].output.load() == winner


# -- statuses seen from another process (fine point 9) --------------------------------------


def _poll_run(client: Client, name: str, until, timeout: float = 60.0) -> PipelineRun:
    """Read the run until `until(run)` holds (the run may not be stored yet at first)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = client.get_pipeline_run(name)
        except Exception as exc:  # not created yet
            last = exc
        else:
            if until(last):
                return last
        time.sleep(0.05)
    pytest.fail(f"run {name!r} never reached the expected state; last seen: {last!r}")


def test_running_statuses_visible_from_another_process(ws: Workspace) -> None:
    """While a step blocks in another process, this process's client sees the run RUNNING,
    that step RUNNING and its finished upstream COMPLETED; then the run completes."""
    proc = ws.spawn("watched", WATCHED, "observed", "0", DELAY="0")
    try:
        ws.wait_for_marks(["blocking"], [proc])
        client = ws.client()
        run = _poll_run(client, "observed",
                        lambda r: r.steps["blocker"].status is StepStatus.RUNNING)
        assert run.status is RunStatus.RUNNING
        assert run.end_time is None
        assert run.steps["prepare"].status is StepStatus.COMPLETED
        assert run.steps["blocker"].attempts == 1
        assert client.list_pipeline_runs(status=RunStatus.RUNNING)[0].name == "observed"
    finally:
        (ws.marks / "release").touch()
    [(code, out, err)] = _finish([proc])
    assert code == 0, err
    assert out.strip() == "completed"
    done = ws.client().get_pipeline_run("observed")
    assert done.status is RunStatus.COMPLETED
    assert done.steps["blocker"].status is StepStatus.COMPLETED


def test_retrying_status_visible_from_another_process(ws: Workspace) -> None:
    """During a long retry delay in another process, this process's client sees the step
    RETRYING (with its first error) while the run is RUNNING; later COMPLETED after 2 tries."""
    proc = ws.spawn("watched", WATCHED, "retried", "1", DELAY="6")
    try:
        ws.wait_for_marks(["flaky-attempt", "blocking"], [proc])
        client = ws.client()
        run = _poll_run(client, "retried",
                        lambda r: r.steps["flaky"].status is StepStatus.RETRYING, timeout=30)
        assert run.status is RunStatus.RUNNING
        assert run.steps["blocker"].status is StepStatus.RUNNING
        assert run.steps["flaky"].attempts == 1
        assert run.steps["flaky"].error is not None
        assert run.steps["flaky"].error.type == "ConnectionError"
        after = _poll_run(client, "retried",
                          lambda r: r.steps["flaky"].status is StepStatus.COMPLETED)
        assert after.status is RunStatus.RUNNING
        assert after.steps["flaky"].attempts == 2
    finally:
        (ws.marks / "release").touch()
    [(code, out, err)] = _finish([proc])
    assert code == 0, err
    assert out.strip() == "completed"
    assert ws.client().get_pipeline_run("retried").steps["flaky"].attempts == 2
