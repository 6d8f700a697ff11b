"""`Client` and `AsyncClient`: reading runs and artifacts back, single-step runs, the active
stack, runs read from SQLite by a fresh process, and unusable stores."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import flowcore
from flowcore import (
    ArtifactLoadError,
    AsyncClient,
    Client,
    FlowcoreError,
    PipelineRun,
    RunFailedError,
    RunNotFoundError,
    RunStatus,
    Stack,
    StepRetryConfig,
    StepStatus,
    StoreError,
    get_step_context,
    pipeline,
    step,
)

REPO = Path(__file__).resolve().parents[1]
METHODS = ("get_pipeline_run", "list_pipeline_runs", "get_artifact_version")


async def query(kind: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call a client method: `Client` from plain synchronous code (a thread with no event
    loop), or `AsyncClient` awaited on this loop."""
    if kind == "sync":
        return await asyncio.to_thread(lambda: getattr(Client(), method)(*args, **kwargs))
    return await getattr(AsyncClient(), method)(*args, **kwargs)


KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


@step(enable_cache=False)
def emit(value: int) -> int:
    return value


@step(enable_cache=False)
def explode(value: int) -> int:
    raise ValueError(f"exploded on {value}")


def test_client_and_async_client_have_the_same_methods() -> None:
    """Both clients offer the contract's query methods and `active_stack`, with equal
    signatures; the async ones are coroutines."""
    import inspect

    for name in METHODS:
        sync_method = getattr(Client, name)
        async_method = getattr(AsyncClient, name)
        assert not inspect.iscoroutinefunction(sync_method)
        assert inspect.iscoroutinefunction(async_method)
        assert inspect.signature(sync_method) == inspect.signature(async_method)
    assert isinstance(Client.active_stack, property)
    assert isinstance(AsyncClient.active_stack, property)


@KINDS
async def test_get_pipeline_run_by_name_and_by_id(stack: Stack, kind: str) -> None:
    """A run is found by its name and by its id, with its steps and loadable outputs."""

    @pipeline
    def lookup_pipeline(v: int = 5):
        emit(v)

    run = await lookup_pipeline.run(v=7)
    by_name = await query(kind, "get_pipeline_run", run.name)
    by_id = await query(kind, "get_pipeline_run", run.id)
    for found in (by_name, by_id):
        assert isinstance(found, PipelineRun)
        assert (found.id, found.name, found.pipeline_name) == (run.id, run.name, "lookup_pipeline")
        assert found.status is RunStatus.COMPLETED
        assert found.steps["emit"].status is StepStatus.COMPLETED
        assert found.steps["emit"].output.load() == 7


@KINDS
async def test_unknown_run_is_run_not_found(stack: Stack, kind: str) -> None:
    """An unknown name or id raises RunNotFoundError, a FlowcoreError naming what was asked."""
    with pytest.raises(RunNotFoundError) as info:
        await query(kind, "get_pipeline_run", "no-such-run-xyz")
    assert isinstance(info.value, FlowcoreError)
    assert "no-such-run-xyz" in str(info.value)


@KINDS
async def test_list_pipeline_runs_filters_newest_first(stack: Stack, kind: str) -> None:
    """`list_pipeline_runs` filters by pipeline name, status and limit, newest first."""

    @pipeline
    def alpha(v: int = 0):
        emit(v)

    @pipeline
    def beta(v: int = 0):
        explode(v)

    names = []
    for i in range(3):
        names.append(("alpha", (await alpha.run(v=i)).name))
        await asyncio.sleep(0.002)
    with pytest.raises(RunFailedError) as info:
        await beta.run(v=1)
    names.append(("beta", info.value.run.name))
    await asyncio.sleep(0.002)
    names.append(("alpha", (await alpha.run(v=9)).name))
    newest_first = [n for _, n in reversed(names)]

    everything = await query(kind, "list_pipeline_runs")
    assert [r.name for r in everything] == newest_first
    only_alpha = await query(kind, "list_pipeline_runs", pipeline_name="alpha")
    assert [r.name for r in only_alpha] == [n for p, n in reversed(names) if p == "alpha"]
    failed = await query(kind, "list_pipeline_runs", status=RunStatus.FAILED)
    assert [r.name for r in failed] == [names[3][1]]
    assert [r.name for r in await query(kind, "list_pipeline_runs", status="failed")] == [
        names[3][1]]
    completed = await query(kind, "list_pipeline_runs", status="completed", limit=2)
    assert [r.name for r in completed] == [names[4][1], names[2][1]]
    assert [r.name for r in await query(kind, "list_pipeline_runs", limit=1)] == [names[4][1]]
    assert await query(kind, "list_pipeline_runs", pipeline_name="beta",
                       status=RunStatus.COMPLETED) == []
    assert await query(kind, "list_pipeline_runs", pipeline_name="gamma") == []


@KINDS
async def test_get_artifact_version_loads_the_value(stack: Stack, kind: str) -> None:
    """An artifact fetched by id loads (`load` and `aload`) the value the step returned."""
    value = {"rows": [1, 2, 3], "name": "table", "nested": {"ok": True}}

    @step(enable_cache=False)
    def make_table() -> dict:
        return value

    @pipeline
    def artifact_pipeline():
        make_table()

    run = await artifact_pipeline.run()
    artifact_id = run.steps["make_table"].output.id
    artifact = await query(kind, "get_artifact_version", artifact_id)
    assert artifact.id == artifact_id
    assert artifact.content_hash == run.steps["make_table"].output.content_hash
    assert await artifact.aload() == value
    assert await asyncio.to_thread(artifact.load) == value


@KINDS
async def test_unknown_artifact_is_artifact_load_error(stack: Stack, kind: str) -> None:
    """An unknown artifact id raises ArtifactLoadError (a FlowcoreError)."""
    with pytest.raises(ArtifactLoadError) as info:
        await query(kind, "get_artifact_version", "0" * 32)
    assert isinstance(info.value, FlowcoreError)


async def test_fan_in_step_reads_earlier_outputs_through_the_client(stack: Stack) -> None:
    """The seed's fan-in: a sync step reads the outputs of the parallel steps of its own run
    through `Client().get_pipeline_run(get_step_context().pipeline_run.name)`."""

    @step
    def load_data() -> list[int]:
        return [1, 2, 3]

    @step(enable_cache=False)
    def process(data: list[int], i: int) -> int:
        return sum(data) * i

    @step(enable_cache=False)
    def combine(step_prefix: str, output_name: str) -> dict[str, int]:
        run = Client().get_pipeline_run(get_step_context().pipeline_run.name)
        return {name: sr.outputs[output_name].load()
                for name, sr in run.steps.items() if name.startswith(step_prefix)}

    @pipeline
    def fan_out_fan_in(parallel_count: int = 4):
        data = load_data()
        after = [process(data, i, id=f"process_{i}") for i in range(parallel_count)]
        combine(step_prefix="process_", output_name="output", after=after)

    run = await fan_out_fan_in.run()
    assert run.status is RunStatus.COMPLETED
    assert run.steps["combine"].output.load() == {f"process_{i}": 6 * i for i in range(4)}


async def test_async_fan_in_step_reads_through_async_client(
    stack: Stack,
) -> None:
    """The same fan-in in an `async def` step through `AsyncClient`, over eight parallel steps
    and ten runs: every run reads every upstream output."""
    n = 8

    @step(enable_cache=False)
    def part(i: int) -> str:
        return "abcdefgh"[i] * (i + 1)

    @step(enable_cache=False)
    async def join() -> str:
        run = await AsyncClient().get_pipeline_run(get_step_context().pipeline_run.id)
        return "".join([await run.steps[f"part_{i}"].output.aload() for i in range(n)])

    @pipeline
    def async_fan_in():
        parts = [part(i, step_name=f"part_{i}") for i in range(n)]
        join(after=parts)

    expected = "".join("abcdefgh"[i] * (i + 1) for i in range(n))
    for _ in range(10):
        run = await async_fan_in.run()
        assert run.steps["join"].output.load() == expected


def test_single_step_runs_are_unlisted_and_return_values(stack: Stack) -> None:
    """`s(...)` outside a pipeline returns its value and adds no listed run."""

    @step
    def add(a: int, b: int) -> int:
        return a + b

    @pipeline
    def listed():
        add(1, 1)

    listed()
    before = [r.name for r in Client().list_pipeline_runs()]
    assert add(2, 3) == 5
    assert add(a=4, b=5) == 9
    assert [r.name for r in Client().list_pipeline_runs()] == before
    assert len(before) == 1
    assert Client().list_pipeline_runs(pipeline_name="add_single_step") == []


async def test_awaited_single_step_runs_are_unlisted_and_return_values(stack: Stack) -> None:
    """`await s.run(...)` returns the value (several outputs as a tuple) and lists nothing."""

    @step
    async def divide(a: int, b: int) -> tuple[int, int]:
        return a // b, a % b

    @step
    def shout(text: str) -> str:
        return text.upper()

    assert await divide.run(17, 5) == (3, 2)
    assert await shout.run("hi") == "HI"
    assert await AsyncClient().list_pipeline_runs() == []
    assert await asyncio.to_thread(Client().list_pipeline_runs) == []


def test_active_stack_is_the_active_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Client().active_stack` follows set_active_stack, then $FLOWCORE_STACK, then the
    default stack under $FLOWCORE_HOME; a stack passed to the client wins."""
    home = Path(os.environ["FLOWCORE_HOME"]).absolute()
    default = Client().active_stack
    assert default.root == home
    assert AsyncClient().active_stack is default

    stack_yaml = tmp_path / "stack.yaml"
    stack_yaml.write_text(
        f"metadata_store: {{path: {tmp_path / 'y' / 'flowcore.db'}}}\n"
        f"artifact_store: {{path: {tmp_path / 'y' / 'artifacts'}}}\n"
    )
    monkeypatch.setenv("FLOWCORE_STACK", str(stack_yaml))
    from_yaml = Client().active_stack
    assert from_yaml is not default
    assert from_yaml is flowcore.get_active_stack()

    memory = Stack.in_memory()
    flowcore.set_active_stack(memory)
    assert Client().active_stack is memory
    assert AsyncClient().active_stack is memory
    other = Stack.in_memory()
    assert Client(other).active_stack is other
    assert AsyncClient(other).active_stack is other

    @pipeline
    def where():
        emit(1)

    where()
    assert len(Client().list_pipeline_runs()) == 1
    assert Client(other).list_pipeline_runs() == []


async def test_client_called_from_an_async_step_body(stack: Stack) -> None:
    """The synchronous client also answers when called on a thread whose loop is running."""

    @step(enable_cache=False)
    def first() -> int:
        return 41

    @step(enable_cache=False)
    async def peek() -> int:
        run = Client().get_pipeline_run(get_step_context().pipeline_run.name)
        return run.steps["first"].output.load() + 1

    @pipeline
    def peeking():
        peek(after=[first()])

    run = await peeking.run()
    assert run.steps["peek"].output.load() == 42


# -- a fresh process reads what the running process saw -------------------------------------

READER = '''
import json, sys
from flowcore import Client, Stack
from snapshot_helper import snapshot

run = Client(Stack.local(sys.argv[1])).get_pipeline_run(sys.argv[2])
print(json.dumps(snapshot(run)))
'''

SNAPSHOT_HELPER = '''
def snapshot(run):
    """Everything a reader can see of a run, as JSON-able data."""
    def iso(t):
        return None if t is None else t.isoformat()

    steps = {}
    for key, sr in run.steps.items():
        steps[key] = {
            "name": sr.name,
            "status": sr.status.value,
            "attempts": sr.attempts,
            "cache_key": sr.cache_key,
            "cache_miss_reason": sr.cache_miss_reason,
            "parameters": sr.config.parameters,
            "start_time": iso(sr.start_time),
            "end_time": iso(sr.end_time),
            "error": None if sr.error is None else [sr.error.type, sr.error.message,
                                                    sr.error.traceback],
            "outputs": {name: {"id": a.id, "uri": a.uri, "hash": a.content_hash,
                               "materializer": a.materializer, "value": a.load()}
                        for name, a in sr.outputs.items()},
        }
    return {"id": run.id, "name": run.name, "pipeline_name": run.pipeline_name,
            "status": run.status.value, "start_time": iso(run.start_time),
            "end_time": iso(run.end_time), "steps": steps}
'''


def test_runs_read_by_a_fresh_process_equal_what_the_runner_saw(tmp_path: Path) -> None:
    """A new process reading the SQLite store sees the same statuses, attempts, parameters,
    errors (type, message, traceback), timings and outputs as the running process did."""
    (tmp_path / "snapshot_helper.py").write_text(SNAPSHOT_HELPER)
    sys.path.insert(0, str(tmp_path))
    try:
        from snapshot_helper import snapshot  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("snapshot_helper", None)
    stack = Stack.local(tmp_path / "stack")
    flowcore.set_active_stack(stack)
    tries = {"n": 0}

    @step
    def load(rows: int, label: str = "data") -> dict[str, Any]:
        return {"label": label, "rows": list(range(rows))}

    @step(retry=StepRetryConfig(max_retries=2, delay=0.0))
    def wobbly(data: dict[str, Any], factor: float) -> list[float]:
        tries["n"] += 1
        if tries["n"] == 1:
            raise ConnectionError("first try fails")
        return [r * factor for r in data["rows"]]

    @step
    def broken(values: list[float], mode: str) -> float:
        raise ValueError(f"cannot summarize in mode {mode!r}")

    @step
    def never(x: float) -> float:
        return x

    @pipeline
    def observed(rows: int = 3):
        data = load(rows, label="numbers")
        values = wobbly(data, factor=1.5)
        never(broken(values, mode="strict"))

    with pytest.raises(RunFailedError) as info:
        observed(rows=4)
    run = info.value.run
    seen = json.loads(json.dumps(snapshot(run)))
    assert seen["steps"]["wobbly"]["attempts"] == 2
    assert seen["steps"]["broken"]["error"][0] == "ValueError"
    assert seen["steps"]["never"]["status"] == "skipped"

    (tmp_path / "reader.py").write_text(READER)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "reader.py"), str(tmp_path / "stack"), run.name],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])},
    )
    assert proc.returncode == 0, proc.stderr
    read_back = json.loads(proc.stdout)
    assert read_back == seen


# -- unusable stores ------------------------------------------------------------------------


def test_corrupt_database_is_a_store_error_naming_the_file() -> None:
    """Garbage in flowcore.db gives a StoreError (a FlowcoreError) naming the file, from the
    client and from a run."""
    home = Path(os.environ["FLOWCORE_HOME"])
    home.mkdir(parents=True)
    db = home / "flowcore.db"
    db.write_bytes(b"this is not a database\x00\xff" * 512)

    with pytest.raises(StoreError) as info:
        Client().list_pipeline_runs()
    assert isinstance(info.value, FlowcoreError)
    assert str(db.absolute()) in str(info.value)

    @pipeline
    def on_garbage():
        emit(1)

    with pytest.raises(StoreError) as info:
        on_garbage()
    assert str(db.absolute()) in str(info.value)


async def test_corrupt_database_from_async_client(tmp_path: Path) -> None:
    """AsyncClient on a garbage database raises StoreError naming the file."""
    root = tmp_path / "bad"
    root.mkdir()
    (root / "flowcore.db").write_bytes(os.urandom(8192))
    with pytest.raises(StoreError) as info:
        await AsyncClient(Stack.local(root)).get_pipeline_run("anything")
    assert str(root / "flowcore.db") in str(info.value)


def test_unwritable_flowcore_home_is_a_clear_flowcore_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A FLOWCORE_HOME below a regular file gives a FlowcoreError naming the path, from the
    client and from a run, not a bare OSError or sqlite3 error."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    home = blocker / "home"
    monkeypatch.setenv("FLOWCORE_HOME", str(home))

    with pytest.raises(FlowcoreError) as info:
        Client().list_pipeline_runs()
    assert str(blocker) in str(info.value)

    @pipeline
    def homeless():
        emit(1)

    with pytest.raises(FlowcoreError) as info:
        homeless()
    assert str(blocker) in str(info.value)


async def test_stored_runs_keep_each_steps_upstream_invocations(stack: Stack) -> None:
    """Each step run records the invocation IDs it waited for (data and after=), and a run
    read back through the client has the same DAG."""

    @step(enable_cache=False)
    def first() -> int:
        return 1

    @step(enable_cache=False)
    def second(x: int) -> int:
        return x

    @step(enable_cache=False)
    def third() -> None:
        return None

    @pipeline
    def dag() -> None:
        a = first()
        b = second(a)
        third(after=[b, "first"])

    run = await dag.run()
    assert run.steps["first"].upstream == ()
    assert run.steps["second"].upstream == ("first",)
    assert set(run.steps["third"].upstream) == {"first", "second"}
    stored = await AsyncClient().get_pipeline_run(run.id)
    assert {n: set(s.upstream) for n, s in stored.steps.items()} == {
        "first": set(), "second": {"first"}, "third": {"first", "second"}}


def test_inside_a_step_the_client_uses_the_runs_own_stack() -> None:
    """A run given its stack with with_options(stack=...) (not the active one): inside its
    steps and hooks, Client().active_stack is that stack, so the seed's alerter hook works."""
    from flowcore.stack import Alerter

    class Recorder(Alerter):
        def __init__(self) -> None:
            self.messages: list[str] = []

        def post(self, message: str, params: dict[str, Any] | None = None) -> bool:
            self.messages.append(message)
            return True

    recorder = Recorder()
    own = Stack.in_memory().with_components(alerter=recorder)
    seen: list[Stack] = []

    def on_failure(step_name: str) -> None:
        Client().active_stack.alerter.post(f"{step_name} just failed!")  # type: ignore[union-attr]

    @step(enable_cache=False, on_failure=on_failure)
    def flaky() -> None:
        seen.append(Client().active_stack)
        raise RuntimeError("nope")

    @pipeline
    def alerting() -> None:
        flaky()

    with pytest.raises(RunFailedError):
        alerting.with_options(stack=own)()
    assert seen == [own]
    assert recorder.messages == ["flaky just failed!"]
    assert Client().active_stack is not own
