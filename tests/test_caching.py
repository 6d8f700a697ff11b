"""The cache-invalidation matrix, through real pipelines on the in-memory, SQLite and default
stacks (API.md section 6)."""

import enum
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import flowcore
from flowcore import (
    Client,
    Materializer,
    PipelineRun,
    RunFailedError,
    RunStatus,
    Stack,
    StepRun,
    StepStatus,
    pipeline,
    step,
)

REPO = Path(__file__).resolve().parents[1]
CACHED = StepStatus.CACHED
COMPLETED = StepStatus.COMPLETED


# -- materializers used only when a step names them (they register for no type) -------------


class JsonDictMaterializer(Materializer):
    """Stores a dict as `data.json`."""

    ASSOCIATED_TYPES = ()

    def save(self, data: Any, uri: str) -> None:
        Path(uri, "data.json").write_text(json.dumps(data, sort_keys=True))

    def load(self, data_type: type, uri: str) -> Any:
        return json.loads(Path(uri, "data.json").read_text())


class ReprDictMaterializer(Materializer):
    """Stores a dict as its sorted items, one `key=value` line each, in `data.txt`."""

    ASSOCIATED_TYPES = ()

    def save(self, data: Any, uri: str) -> None:
        Path(uri, "data.txt").write_text("\n".join(f"{k}={v}" for k, v in sorted(data.items())))

    def load(self, data_type: type, uri: str) -> Any:
        lines = Path(uri, "data.txt").read_text().splitlines()
        return {k: int(v) for k, v in (line.split("=", 1) for line in lines)}


# -- stacks ---------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "default", "postgres+s3"])
def any_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The in-memory stack, a SQLite stack at a tmp path, the default stack under
    $FLOWCORE_HOME (no stack set), or Postgres + S3 on the session's servers."""
    if request.param == "memory":
        s = Stack.in_memory()
        flowcore.set_active_stack(s)
    elif request.param == "postgres+s3":
        shared = request.getfixturevalue("shared_stores")
        s = Stack.from_urls(metadata=shared.metadata, artifacts=shared.artifacts,
                            storage_options=shared.storage_options)
        flowcore.set_active_stack(s)
    elif request.param == "sqlite":
        s = Stack.local(tmp_path / "stack")
        flowcore.set_active_stack(s)
    else:
        flowcore.set_active_stack(None)
        s = Client().active_stack
        assert s.root == Path(os.environ["FLOWCORE_HOME"]).absolute()
    yield s
    flowcore.set_active_stack(None)


@pytest.fixture(params=["sqlite", "default"])
def disk_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack whose artifacts are directories on disk: a SQLite stack or the default one."""
    if request.param == "sqlite":
        s = Stack.local(tmp_path / "stack")
        flowcore.set_active_stack(s)
    else:
        flowcore.set_active_stack(None)
        s = Client().active_stack
    yield s
    flowcore.set_active_stack(None)


def statuses(run: PipelineRun) -> dict[str, StepStatus]:
    """Invocation ID -> status."""
    return {k: s.status for k, s in run.steps.items()}


def assert_hit(sr: StepRun) -> None:
    """A cache hit: CACHED, with a key and no miss reason."""
    assert sr.status is CACHED, sr
    assert sr.cache_key
    assert sr.cache_miss_reason is None


def assert_miss(sr: StepRun) -> None:
    """A cache miss: the body ran (COMPLETED) and a miss reason is recorded."""
    assert sr.status is COMPLETED, sr
    assert sr.cache_miss_reason, sr


# -- hits -----------------------------------------------------------------------------------


async def test_identical_second_run_is_all_cached_without_bodies_or_hooks(any_stack: Stack) -> None:
    """A second identical run is all CACHED, runs no step body and no hook, and keeps the keys."""
    calls: list[str] = []
    hooks: list[str] = []

    def on_start(step_name):
        hooks.append(f"start:{step_name}")

    def on_success(step_name):
        hooks.append(f"success:{step_name}")

    def on_end(step_name):
        hooks.append(f"end:{step_name}")

    def own_start(step_name):
        hooks.append(f"own-start:{step_name}")

    @step
    def load(n: int) -> list[int]:
        calls.append("load")
        return list(range(n))

    @step(on_start=own_start)
    async def total(values: list[int]) -> int:
        calls.append("total")
        return sum(values)

    @step
    def report(value: int, label: str = "sum") -> str:
        calls.append("report")
        return f"{label}={value}"

    @pipeline(on_start=on_start, on_success=on_success, on_end=on_end)
    def hit_pipeline(n: int = 4):
        report(total(load(n)))

    first = await hit_pipeline.run()
    assert statuses(first) == {"load": COMPLETED, "total": COMPLETED, "report": COMPLETED}
    assert sorted(calls) == ["load", "report", "total"]
    assert len(hooks) == 9
    for sr in first.steps.values():
        assert_miss(sr)
        assert sr.cache_key
    calls.clear()
    hooks.clear()

    second = await hit_pipeline.run()
    assert second.status is RunStatus.COMPLETED
    assert statuses(second) == {"load": CACHED, "total": CACHED, "report": CACHED}
    assert calls == []
    assert hooks == []
    for name, sr in second.steps.items():
        assert_hit(sr)
        assert sr.cache_key == first.steps[name].cache_key
    assert second.steps["report"].output.load() == "sum=6"
    assert await second.steps["total"].output.aload() == 6

    stored = Client().get_pipeline_run(second.name)
    for name, sr in stored.steps.items():
        assert_hit(sr)
        assert sr.cache_key == first.steps[name].cache_key
    stored_first = Client().get_pipeline_run(first.id)
    assert all(sr.cache_miss_reason for sr in stored_first.steps.values())


def test_default_stack_caches_across_sync_calls() -> None:
    """With no stack set, `p()` twice caches in the SQLite store under $FLOWCORE_HOME."""
    calls: list[int] = []

    @step
    def triple(x: int) -> int:
        calls.append(x)
        return 3 * x

    @pipeline
    def default_pipeline(x: int = 2):
        triple(x)

    assert default_pipeline().steps["triple"].status is COMPLETED
    run = default_pipeline()
    assert_hit(run.steps["triple"])
    assert calls == [2]
    home = Path(os.environ["FLOWCORE_HOME"])
    assert (home / "flowcore.db").is_file()
    # A small value is kept inline, in the row of home's flowcore.db (no artifact file).
    assert run.steps["triple"].output.uri.startswith("inline:")


async def test_equal_inputs_give_equal_cache_keys(any_stack: Stack) -> None:
    """Two invocations with equal parameters share a key; a different parameter gives another."""

    @step
    def double(x: int) -> int:
        return 2 * x

    @pipeline
    def keyed():
        double(3, step_name="first")
        double(3, step_name="second")
        double(4, step_name="third")

    run = await keyed.run()
    keys = {k: sr.cache_key for k, sr in run.steps.items()}
    assert keys["first"] and keys["first"] == keys["second"]
    assert keys["third"] and keys["third"] != keys["first"]
    again = await keyed.run()
    assert {k: sr.cache_key for k, sr in again.steps.items()} == keys
    assert set(statuses(again).values()) == {CACHED}


async def test_upstream_rerun_with_identical_content_still_hits_downstream(any_stack: Stack) -> None:
    """An upstream step with caching off re-runs each time; equal output content still gives
    its downstream step a hit."""
    source = {"value": 10}
    calls: list[str] = []

    @step(enable_cache=False)
    def read_source() -> int:
        calls.append("read")
        return source["value"]

    @step
    def consume(v: int) -> int:
        calls.append("consume")
        return v + 1

    @pipeline
    def upstream_pipeline():
        consume(read_source())

    first = await upstream_pipeline.run()
    assert_miss(first.steps["consume"])
    second = await upstream_pipeline.run()
    assert second.steps["read_source"].status is COMPLETED
    assert_hit(second.steps["consume"])
    assert second.steps["consume"].cache_key == first.steps["consume"].cache_key
    assert calls == ["read", "consume", "read"]


# -- misses ---------------------------------------------------------------------------------


def _load_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag: str, source: str) -> Any:
    """Import `source` as a fresh module from its own file (so the step has real source)."""
    path = tmp_path / f"cache_variant_{tag}.py"
    path.write_text(textwrap.dedent(source))
    name = f"cache_variant_{tag}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


VARIANT = '''
from flowcore import step

CALLS = []


@step
def transform(x: int) -> int:
    CALLS.append(x)
    return {expression}
'''


async def test_changed_step_code_misses(any_stack: Stack, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of the same name whose body changed misses; the old body, re-imported, hits."""
    plus_one = _load_variant(tmp_path, monkeypatch, "a", VARIANT.format(expression="x + 1"))
    times_ten = _load_variant(tmp_path, monkeypatch, "b", VARIANT.format(expression="x * 10"))
    plus_one_again = _load_variant(tmp_path, monkeypatch, "c", VARIANT.format(expression="x + 1"))

    def build(transform: Any) -> Any:
        @pipeline(name="code_pipeline")
        def code_pipeline():
            transform(5)

        return code_pipeline

    first = await build(plus_one.transform).run()
    assert_miss(first.steps["transform"])
    changed = await build(times_ten.transform).run()
    assert_miss(changed.steps["transform"])
    assert changed.steps["transform"].output.load() == 50
    assert changed.steps["transform"].cache_key != first.steps["transform"].cache_key
    assert times_ten.CALLS == [5]

    back = await build(plus_one_again.transform).run()
    assert_hit(back.steps["transform"])
    assert back.steps["transform"].output.load() == 6
    assert plus_one_again.CALLS == []


async def test_changed_parameter_misses(any_stack: Stack) -> None:
    """A changed parameter value misses; the earlier value still hits."""
    calls: list[float] = []

    @step
    def scale(factor: float, base: int = 2) -> float:
        calls.append(factor)
        return base * factor

    @pipeline
    def param_pipeline(factor: float = 1.5):
        scale(factor)

    a = await param_pipeline.run(factor=1.5)
    b = await param_pipeline.run(factor=2.5)
    c = await param_pipeline.run(factor=1.5)
    assert_miss(a.steps["scale"])
    assert_miss(b.steps["scale"])
    assert b.steps["scale"].cache_key != a.steps["scale"].cache_key
    assert_hit(c.steps["scale"])
    assert calls == [1.5, 2.5]
    assert c.steps["scale"].output.load() == 3.0


async def test_changed_input_content_misses(any_stack: Stack) -> None:
    """Changed content of an input artifact misses even though the upstream step is unchanged."""
    source = {"value": [1, 2, 3]}
    calls: list[list[int]] = []

    @step(enable_cache=False)
    def read_source() -> list[int]:
        return list(source["value"])

    @step
    def total(values: list[int]) -> int:
        calls.append(values)
        return sum(values)

    @pipeline
    def content_pipeline():
        total(read_source())

    first = await content_pipeline.run()
    source["value"] = [1, 2, 4]
    second = await content_pipeline.run()
    assert_miss(first.steps["total"])
    assert_miss(second.steps["total"])
    assert second.steps["total"].cache_key != first.steps["total"].cache_key
    assert second.steps["total"].output.load() == 7
    assert calls == [[1, 2, 3], [1, 2, 4]]


async def test_changed_output_materializer_misses(any_stack: Stack) -> None:
    """Changing a step's output materializer (`output_materializers=`) misses; the same one
    again hits."""
    calls: list[str] = []

    @step
    def make_counts() -> dict:
        calls.append("make")
        return {"a": 1, "b": 2}

    def build(s: Any) -> Any:
        @pipeline(name="materializer_pipeline")
        def materializer_pipeline():
            s()

        return materializer_pipeline

    runs = [
        await build(make_counts).run(),
        await build(make_counts.with_options(
            output_materializers={"output": JsonDictMaterializer})).run(),
        await build(make_counts.with_options(
            output_materializers={"output": JsonDictMaterializer})).run(),
        await build(make_counts.with_options(
            output_materializers={"output": ReprDictMaterializer})).run(),
        await build(make_counts).run(),
    ]
    srs = [r.steps["make_counts"] for r in runs]
    assert [sr.status for sr in srs] == [COMPLETED, COMPLETED, CACHED, COMPLETED, CACHED]
    assert len(calls) == 3
    assert len({srs[0].cache_key, srs[1].cache_key, srs[3].cache_key}) == 3
    assert srs[1].output.materializer.endswith("JsonDictMaterializer")
    assert srs[3].output.materializer.endswith("ReprDictMaterializer")
    assert srs[3].output.load() == {"a": 1, "b": 2}


@pytest.mark.parametrize("level", ["step", "pipeline"])
async def test_changed_output_settings_miss(any_stack: Stack, level: str) -> None:
    """Changing `settings={"output_materializers": ...}` (step or pipeline level) misses."""
    calls: list[str] = []

    @step
    def make_counts() -> dict:
        calls.append("make")
        return {"x": 3}

    def build(materializer: type[Materializer]) -> Any:
        settings = {"output_materializers": {"output": materializer}}
        s = make_counts.with_options(settings=settings) if level == "step" else make_counts
        opts = {"settings": settings} if level == "pipeline" else {}

        @pipeline(name="settings_pipeline", **opts)
        def settings_pipeline():
            s()

        return settings_pipeline

    a = (await build(JsonDictMaterializer).run()).steps["make_counts"]
    b = (await build(ReprDictMaterializer).run()).steps["make_counts"]
    c = (await build(ReprDictMaterializer).run()).steps["make_counts"]
    assert_miss(a)
    assert_miss(b)
    assert a.cache_key != b.cache_key
    assert_hit(c)
    assert calls == ["make", "make"]
    assert b.output.materializer.endswith("ReprDictMaterializer")


async def test_fan_out_elements_are_cached_one_by_one(any_stack: Stack) -> None:
    """With one more mapped element, the earlier elements hit and only the new one runs."""
    calls: list[int] = []

    @step(enable_cache=False)
    def chunks(n: int) -> list[int]:
        return list(range(n))

    @step
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    @step
    def total(values: list[int]) -> int:
        return sum(values)

    @pipeline
    def fan_pipeline(n: int = 3):
        total(square.map(chunks(n)))

    await fan_pipeline.run(n=3)
    run = await fan_pipeline.run(n=4)
    for k in range(3):
        assert_hit(run.steps[f"square[{k}]"])
    assert_miss(run.steps["square[3]"])
    assert_miss(run.steps["total"])
    assert sorted(calls) == [0, 1, 2, 3]
    assert run.steps["total"].output.load() == 0 + 1 + 4 + 9


def test_deleted_artifact_directory_is_a_miss_not_a_crash(disk_stack: Stack) -> None:
    """Deleting a cached step's artifact directory makes that step miss; the run completes."""
    calls: list[str] = []

    @step
    def produce() -> list[int]:
        calls.append("produce")
        return list(range(7, 2007))  # over the inline limit: stored as a directory

    @step
    def count(values: list[int]) -> str:
        calls.append("count")
        return f"{len(values)} values: {values}"  # over the inline limit too

    @pipeline
    def artifact_pipeline():
        count(produce())

    first = artifact_pipeline()
    uri = first.steps["produce"].output.uri
    assert os.path.isdir(uri)
    shutil.rmtree(uri)

    second = artifact_pipeline()
    assert second.status is RunStatus.COMPLETED
    assert_miss(second.steps["produce"])
    # produce wrote equal content again, so count's key is unchanged and it hits.
    assert_hit(second.steps["count"])
    assert calls == ["produce", "count", "produce"]
    assert second.steps["produce"].output.load() == list(range(7, 2007))
    listed = f"2000 values: {list(range(7, 2007))}"
    assert second.steps["count"].output.load() == listed
    stored = Client().get_pipeline_run(second.name)
    assert stored.steps["produce"].cache_miss_reason

    shutil.rmtree(second.steps["count"].output.uri)
    third = artifact_pipeline()
    assert third.status is RunStatus.COMPLETED
    assert_hit(third.steps["produce"])
    assert_miss(third.steps["count"])
    assert third.steps["count"].output.load() == listed


# -- uncacheable parameters -----------------------------------------------------------------


@pytest.mark.parametrize("make_value", [object, lambda: (lambda x: x)], ids=["object", "lambda"])
async def test_unhashable_parameter_makes_step_uncacheable(
    any_stack: Stack, make_value: Callable[[], Any], caplog: pytest.LogCaptureFixture,
) -> None:
    """A parameter with no stable hash runs the step every time (the same value too), records
    why, and never gives a false hit."""
    caplog.set_level(logging.INFO, logger="flowcore")
    calls: list[str] = []

    @step
    def use_thing(thing: Any, n: int = 1) -> int:
        calls.append(type(thing).__name__)
        return n

    @pipeline
    def opaque_pipeline(thing: Any = None):
        use_thing(thing)

    value = make_value()
    runs = [await opaque_pipeline.run(thing=value),
            await opaque_pipeline.run(thing=value),
            await opaque_pipeline.run(thing=make_value())]
    assert len(calls) == 3
    for run in runs:
        assert run.status is RunStatus.COMPLETED
        sr = run.steps["use_thing"]
        assert sr.status is COMPLETED
        assert sr.cache_miss_reason and "thing" in sr.cache_miss_reason
    stored = Client().get_pipeline_run(runs[-1].id).steps["use_thing"]
    assert stored.cache_miss_reason and "thing" in stored.cache_miss_reason
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("flowcore")]
    assert any("use_thing" in m and "thing" in m and "hash" in m for m in logged), logged


class Level(enum.IntEnum):
    LOW = 1


class Mode(enum.StrEnum):
    TRAIN = "train"




@pytest.mark.parametrize(
    ("first", "second"),
    [
        (True, 1),
        (1, 1.0),
        ("1", 1),
        ((1, 2), [1, 2]),
        ({"a": 1}, {"a": 1.0}),
        ({1, 2}, [1, 2]),
        (None, "null"),
        pytest.param({1: "a"}, {"1": "a"}, id="int-key-vs-str-key"),
        pytest.param({True: "a"}, {"true": "a"}, id="bool-key-vs-str-key"),
        pytest.param(Level.LOW, 1, id="intenum-vs-int"),
        pytest.param(Mode.TRAIN, "train", id="strenum-vs-str"),
    ],
)
async def test_distinct_parameter_values_never_share_a_hit(memory_stack: Stack, first: Any,
                                                           second: Any) -> None:
    """Two parameter values a step can tell apart (their reprs differ) never share a cache
    entry: the second run misses and returns its own output."""

    @step
    def show(value: Any) -> str:
        return repr(value)

    @pipeline
    def distinct_pipeline(value: Any = None):
        show(value)

    a = (await distinct_pipeline.run(value=first)).steps["show"]
    b = (await distinct_pipeline.run(value=second)).steps["show"]
    assert a.output.load() == repr(first)
    assert b.output.load() == repr(second)
    assert_miss(b)
    assert a.cache_key != b.cache_key


async def test_failed_step_is_never_a_cache_entry(any_stack: Stack) -> None:
    """A step that failed is not reused: the next run with equal inputs runs it again."""
    state = {"fail": True}
    calls: list[str] = []

    @step
    def flaky(x: int) -> int:
        calls.append("flaky")
        if state["fail"]:
            raise RuntimeError("not yet")
        return x

    @pipeline
    def failing_pipeline():
        flaky(1)

    with pytest.raises(RunFailedError):
        await failing_pipeline.run()
    state["fail"] = False
    run = await failing_pipeline.run()
    assert_miss(run.steps["flaky"])
    assert calls == ["flaky", "flaky"]
    assert_hit((await failing_pipeline.run()).steps["flaky"])


async def test_cached_multi_output_upstream_feeds_a_changed_downstream(any_stack: Stack) -> None:
    """A changed downstream step gets each output of its CACHED multi-output upstream loaded
    from the cache."""
    calls: list[str] = []

    @step
    def split(n: int) -> tuple[list[int], list[int]]:
        calls.append("split")
        evens = [i for i in range(n) if i % 2 == 0]
        odds = [i for i in range(n) if i % 2]
        return evens, odds

    @step
    def weigh(evens: list[int], odds: list[int], w: int) -> int:
        calls.append("weigh")
        return sum(evens) * w - sum(odds)

    @pipeline
    def split_pipeline(w: int = 1):
        evens, odds = split(6)
        weigh(evens, odds, w)

    first = await split_pipeline.run(w=1)
    second = await split_pipeline.run(w=3)
    assert first.steps["weigh"].output.load() == 6 - 9
    assert_hit(second.steps["split"])
    assert_miss(second.steps["weigh"])
    assert second.steps["weigh"].output.load() == 6 * 3 - 9
    assert calls == ["split", "weigh", "weigh"]


# -- cross-process stability ----------------------------------------------------------------

HASHSEED_SCRIPT = '''
import json, os
import flowcore
from flowcore import Stack, pipeline, step

flowcore.set_active_stack(Stack.local(os.environ["STACK_PATH"]))


@step
def summarize(tags: frozenset[str], weights: dict[str, float], pair: tuple[str, int]) -> str:
    with open(os.environ["MARKER"], "a") as f:
        f.write("summarize\\n")
    return ",".join(sorted(tags)) + repr(sorted(weights.items())) + repr(pair)


@step
def shout(text: str) -> str:
    return text.upper()


TAGS = frozenset(f"tag-{i}" for i in range(32))


@pipeline
def hashed_pipeline():
    # Both the set and the dict built from it iterate in an order set by PYTHONHASHSEED.
    shout(summarize(TAGS, {t: len(t) / 7 for t in TAGS}, ("p", 1)))


run = hashed_pipeline()
print(json.dumps({
    "order": list(TAGS),
    "steps": {k: [s.status.value, s.cache_key] for k, s in run.steps.items()},
}))
'''


def test_cache_keys_stable_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    """A second process with another PYTHONHASHSEED computes the same keys and gets hits."""
    script = tmp_path / "hashed.py"
    script.write_text(HASHSEED_SCRIPT)
    marker = tmp_path / "ran.txt"
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "STACK_PATH": str(tmp_path / "stack"),
               "MARKER": str(marker), "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env=env, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = outputs
    assert first["order"] != second["order"], "the seeds did not change set iteration order"
    assert {k: v[0] for k, v in first["steps"].items()} == {"summarize": "completed",
                                                            "shout": "completed"}
    assert {k: v[0] for k, v in second["steps"].items()} == {"summarize": "cached",
                                                             "shout": "cached"}
    assert {k: v[1] for k, v in first["steps"].items()} == {
        k: v[1] for k, v in second["steps"].items()}
    assert marker.read_text().splitlines() == ["summarize"]


# -- enable_cache precedence ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("step_cache", "pipeline_cache", "expected"),
    [
        (None, None, CACHED),
        (None, True, CACHED),
        (None, False, COMPLETED),
        (True, False, CACHED),
        (False, True, COMPLETED),
        (False, None, COMPLETED),
    ],
)
async def test_enable_cache_precedence_in_decorators(
    any_stack: Stack, step_cache: bool | None, pipeline_cache: bool | None, expected: StepStatus,
) -> None:
    """`enable_cache` resolves step explicit > pipeline explicit > default True, with an
    entry for the key already in the cache."""
    calls: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        return x + 1

    @pipeline(name="precedence")
    def primer():
        step(work)(1)

    primed = await primer.run()
    assert_miss(primed.steps["work"])

    step_opts = {} if step_cache is None else {"enable_cache": step_cache}
    pipe_opts = {} if pipeline_cache is None else {"enable_cache": pipeline_cache}
    configured = step(**step_opts)(work)

    @pipeline(name="precedence", **pipe_opts)
    def precedence():
        configured(1)

    run = await precedence.run()
    assert run.steps["work"].status is expected
    assert len(calls) == (1 if expected is CACHED else 2)


def _option_variants(work: Callable[..., Any], tmp_path: Path) -> dict[str, tuple[Any, StepStatus]]:
    """Pipelines configured through with_options / configure / YAML, with the expected status."""
    plain = step(work)
    explicit_on = step(enable_cache=True)(work)

    def build(s: Any, **opts: Any) -> Any:
        @pipeline(name="options_pipeline", **opts)
        def options_pipeline():
            s(1)

        return options_pipeline

    off_yaml = tmp_path / "off.yaml"
    off_yaml.write_text("enable_cache: false\n")
    step_on_yaml = tmp_path / "step_on.yaml"
    step_on_yaml.write_text("enable_cache: false\nsteps:\n  work:\n    enable_cache: true\n")
    step_off_yaml = tmp_path / "step_off.yaml"
    step_off_yaml.write_text("steps:\n  work:\n    enable_cache: false\n")
    return {
        "step.with_options(False)": (build(plain.with_options(enable_cache=False)), COMPLETED),
        "step.configure(False)": (build(step(work).configure(enable_cache=False)), COMPLETED),
        "pipeline.with_options(False)": (build(plain).with_options(enable_cache=False), COMPLETED),
        "pipeline.configure(False)": (build(plain).configure(enable_cache=False), COMPLETED),
        "pipeline.with_options(False), step True": (
            build(explicit_on).with_options(enable_cache=False), CACHED),
        "pipeline.configure(False), step.with_options(True)": (
            build(plain.with_options(enable_cache=True)).configure(enable_cache=False), CACHED),
        "pipeline False, pipeline.with_options(True)": (
            build(plain, enable_cache=False).with_options(enable_cache=True), CACHED),
        "yaml off": (build(plain).with_options(config_path=str(off_yaml)), COMPLETED),
        "yaml off, yaml step on": (build(plain).with_options(config_path=str(step_on_yaml)), CACHED),
        "yaml step off": (build(plain).with_options(config_path=str(step_off_yaml)), COMPLETED),
    }


async def test_enable_cache_through_with_options_configure_and_yaml(
    any_stack: Stack, tmp_path: Path,
) -> None:
    """`with_options`, `configure` and a YAML file set the same `enable_cache` fields, with the
    same precedence."""
    calls: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        return x + 1

    @pipeline(name="options_pipeline")
    def primer():
        step(work)(1)

    await primer.run()
    variants = _option_variants(work, tmp_path)
    got = {}
    for label, (p, _) in variants.items():
        run = await p.run()
        got[label] = run.steps["work"].status
    assert got == {label: expected for label, (_, expected) in variants.items()}
    assert len(calls) == 1 + sum(1 for _, e in variants.values() if e is COMPLETED)


async def test_step_configure_changes_the_step_in_place(any_stack: Stack) -> None:
    """`step.configure(enable_cache=False)` after a cached run turns caching off for the same
    step object in the same pipeline."""
    calls: list[int] = []

    @step
    def inc(x: int) -> int:
        calls.append(x)
        return x + 1

    @pipeline
    def in_place():
        inc(1)

    await in_place.run()
    assert_hit((await in_place.run()).steps["inc"])
    assert inc.configure(enable_cache=False) is inc
    assert (await in_place.run()).steps["inc"].status is COMPLETED
    assert calls == [1, 1]
