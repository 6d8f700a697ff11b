"""API.md §12.14-12.19 on the definition side: lax inputs, outputs, definition and option errors."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import pytest

import flowcore
from flowcore import (
    ConfigError,
    ExecutionMode,
    FlowcoreError,
    OutputHandle,
    PipelineDefinitionError,
    RunFailedError,
    StepInputError,
    StepOutputError,
    StepRetryConfig,
    pipeline,
    step,
)
from flowcore._naming import format_run_name
from flowcore.client import Client
from flowcore.config import env_flag

# -- §12.14 lax input validation --------------------------------------------------------------


def test_input_check_returns_the_lax_validated_value() -> None:
    """An int input's check converts 3.0 and "3" to 3 and returns it."""

    @step
    def take(n: int, xs: list[int]) -> int:
        return n

    check = take.signature.inputs["n"].check
    assert check is not None
    assert check(3) == 3
    for raw in (3.0, "3"):
        out = check(raw)
        assert out == 3 and type(out) is int
    list_check = take.signature.inputs["xs"].check
    assert list_check is not None
    assert list_check(["1", 2.0]) == [1, 2]


@pytest.mark.parametrize("bad", ["three", 3.5])
def test_input_check_rejects_unconvertible_values(bad: Any) -> None:
    """A value pydantic cannot convert to int makes the check raise TypeError."""

    @step
    def take(n: int) -> int:
        return n

    check = take.signature.inputs["n"].check
    assert check is not None
    with pytest.raises(TypeError):
        check(bad)


def test_unannotated_input_has_no_check() -> None:
    """A parameter without an annotation costs nothing: its check is None."""

    @step
    def loose(x, y: Any) -> None:  # type: ignore[no-untyped-def]
        return None

    assert loose.signature.inputs["x"].check is None
    assert loose.signature.inputs["y"].check is None
    assert not loose.signature.checked_inputs


def test_output_check_stays_strict() -> None:
    """A returned "3" for an int output is still rejected (outputs are not converted)."""

    @step
    def give() -> int:
        return 3

    check = give.signature.outputs[0].check
    assert check is not None
    with pytest.raises(TypeError):
        check("3")


async def test_body_receives_the_validated_input(memory_stack: Any) -> None:
    """A step whose int input gets "3" and 3.0 receives the int 3 in its body."""
    seen: list[Any] = []

    @step(enable_cache=False)
    def take(n: int) -> None:
        seen.append(n)

    @pipeline(enable_cache=False)
    def p() -> None:
        take("3", step_name="from_str")
        take(3.0, step_name="from_float")

    await p.run()
    assert seen == [3, 3]
    assert all(type(v) is int for v in seen)


@pytest.mark.parametrize("bad", ["three", 3.5])
async def test_unconvertible_input_is_step_input_error(memory_stack: Any, bad: Any) -> None:
    """"three" or 3.5 for an int input fails the step with StepInputError before its body."""
    ran: list[int] = []

    @step(enable_cache=False)
    def take(n: int) -> None:
        ran.append(n)

    @pipeline(enable_cache=False)
    def p() -> None:
        take(bad)

    with pytest.raises(RunFailedError) as info:
        await p.run()
    assert isinstance(info.value.__cause__, StepInputError)
    assert "take" in str(info.value.__cause__) and "'n'" in str(info.value.__cause__)
    assert ran == []


def listed_runs() -> list[Any]:
    """Every run recorded on the active stack."""
    return list(Client().list_pipeline_runs())


# -- §12.15 the tuple-literal rule ------------------------------------------------------------


def test_tuple_literal_with_non_tuple_annotation_is_one_output() -> None:
    """`-> Annotated[list, "out"]` returning `1, 2, 3` has one output "out" checked against list."""

    @step
    def listy() -> Annotated[list, "out"]:  # type: ignore[type-arg]
        return 1, 2, 3  # type: ignore[return-value]

    sig = listy.signature
    assert sig.output_names == ("out",)
    assert not sig.multiple_outputs
    check = sig.outputs[0].check
    assert check is not None
    with pytest.raises(TypeError):
        check((1, 2, 3))


def test_tuple_literal_with_named_tuple_annotation_is_one_output() -> None:
    """`-> Annotated[tuple[int, int], "pair"]` returning `1, 2` is one output named "pair"."""

    @step
    def pair() -> Annotated[tuple[int, int], "pair"]:
        return 1, 2

    assert pair.signature.output_names == ("pair",)
    assert not pair.signature.multiple_outputs


def test_tuple_literal_without_or_with_tuple_annotation_is_several_outputs() -> None:
    """No annotation, `tuple[...]` and `tuple[int, ...]` keep the tuple-literal rule."""

    @step
    def bare():  # type: ignore[no-untyped-def]
        return 1, 2

    @step
    def typed() -> tuple[int, Annotated[str, "word"]]:
        return 1, "a"

    @step
    def variadic() -> tuple[int, ...]:
        return 1, 2, 3

    assert bare.signature.output_names == ("output_0", "output_1")
    assert typed.signature.output_names == ("output_0", "word")
    assert variadic.signature.output_names == ("output_0", "output_1", "output_2")
    assert all(s.annotation is int for s in variadic.signature.outputs)


async def test_non_tuple_annotation_output_fails_at_run_time(memory_stack: Any) -> None:
    """The single output of `-> Annotated[list, "out"]` returning a tuple is a StepOutputError."""

    @step(enable_cache=False)
    def listy() -> Annotated[list, "out"]:  # type: ignore[type-arg]
        return 1, 2, 3  # type: ignore[return-value]

    handles: list[Any] = []

    @pipeline(enable_cache=False)
    def p() -> None:
        handles.append(listy())

    with pytest.raises(RunFailedError) as info:
        await p.run()
    assert isinstance(handles[0], OutputHandle) and handles[0].output_name == "out"
    assert isinstance(info.value.__cause__, StepOutputError)
    assert "'out'" in str(info.value.__cause__)


def test_two_outputs_with_one_name_is_a_definition_error_at_decoration() -> None:
    """Two outputs named alike are a PipelineDefinitionError raised by `@step` itself."""
    with pytest.raises(PipelineDefinitionError) as info:

        @step
        def twins() -> tuple[Annotated[int, "x"], Annotated[int, "x"]]:
            return 1, 2

    assert "twins" in str(info.value) and "'x'" in str(info.value)
    with pytest.raises(PipelineDefinitionError):

        @step
        def clash() -> tuple[Annotated[int, "output_1"], int]:
            return 1, 2


# -- §12.16 generators and hidden handles -----------------------------------------------------


def test_generator_function_is_a_definition_error_at_step() -> None:
    """`@step` on a generator or an async generator function raises PipelineDefinitionError."""
    with pytest.raises(PipelineDefinitionError) as info:

        @step
        def gen() -> Iterator[int]:
            yield 1

    assert "gen" in str(info.value)
    with pytest.raises(PipelineDefinitionError):

        @step(enable_cache=False)
        async def agen() -> AsyncIterator[int]:
            yield 1


@dataclasses.dataclass
class _Holder:
    payload: Any


class _Plain:
    def __init__(self, payload: Any) -> None:
        self.payload = payload


@pytest.mark.parametrize(
    "wrap",
    [
        lambda h: {h},
        lambda h: frozenset([h]),
        lambda h: _Holder(h),
        lambda h: _Plain([1, h]),
        lambda h: [{"k": _Holder(h)}],
        lambda h: {h: 1},
    ],
    ids=["set", "frozenset", "dataclass", "object", "nested-in-list", "dict-key"],
)
async def test_handle_hidden_in_other_objects_is_a_definition_error(
    memory_stack: Any, wrap: Any
) -> None:
    """A handle inside a set, frozenset, dataclass or object is refused at compile time."""
    ran: list[str] = []

    @step(enable_cache=False)
    def make() -> int:
        ran.append("make")
        return 1

    @step(enable_cache=False)
    def use(things: Any) -> None:
        ran.append("use")

    @pipeline(enable_cache=False)
    def hides() -> None:
        use(things=wrap(make()))

    with pytest.raises(PipelineDefinitionError) as info:
        await hides.run()
    message = str(info.value)
    assert "'hides'" in message and "'use'" in message and "'things'" in message
    assert ran == []
    assert listed_runs() == []


async def test_objects_without_handles_still_pass(memory_stack: Any) -> None:
    """Sets, dataclasses and objects holding only plain values are ordinary parameters."""
    seen: list[Any] = []

    @step(enable_cache=False)
    def use(a: Any, b: Any, c: Any) -> None:
        seen.extend([a, b, c.payload])

    @pipeline(enable_cache=False)
    def p() -> None:
        use({1, 2}, _Holder(3), _Plain(4))

    await p.run()
    assert seen == [{1, 2}, _Holder(3), 4]


# -- §12.17 options validated where they enter ------------------------------------------------

_BAD_STEP_OPTIONS = [
    ("retry", 3),
    ("timeout", "soon"),
    ("timeout", -1),
    ("timeout", 0),
    ("timeout", float("nan")),
    ("timeout", float("inf")),
    ("timeout", True),
    ("step_operator", 5),
    ("experiment_tracker", ["mlflow"]),
    ("enable_cache", "yes"),
]


def _plain() -> int:
    return 1


@pytest.mark.parametrize(("key", "value"), _BAD_STEP_OPTIONS)
def test_bad_step_option_is_config_error_at_every_entry(key: str, value: Any) -> None:
    """A bad step option is a ConfigError naming the step and key from the decorator,
    `configure` and `with_options`."""
    with pytest.raises(ConfigError) as info:
        step(**{key: value})(_plain)
    assert "'_plain'" in str(info.value) and f"'{key}'" in str(info.value)
    good = step(_plain)
    with pytest.raises(ConfigError) as info:
        good.with_options(**{key: value})
    assert "'_plain'" in str(info.value) and f"'{key}'" in str(info.value)
    with pytest.raises(ConfigError):
        good.configure(**{key: value})
    assert key not in good.options


def test_good_step_options_are_accepted() -> None:
    """Ints for seconds, a retry mapping and component names pass."""
    s = step(timeout=5, retry={"max_retries": 2}, step_operator="dask",
             experiment_tracker="mlflow", enable_cache=None)(_plain)
    assert s.options["timeout"] == 5
    s.configure(timeout=0.5, retry=StepRetryConfig(max_retries=1), enable_cache=False)


_BAD_PIPELINE_OPTIONS = [
    ("max_concurrency", 0),
    ("max_concurrency", 1.5),
    ("max_concurrency", True),
    ("max_concurrency", "2"),
    ("execution_mode", "fastest"),
    ("enable_cache", 1),
    ("retry", 3),
    ("synchronous", "no"),
    ("stack", "local"),
]


@pytest.mark.parametrize(("key", "value"), _BAD_PIPELINE_OPTIONS)
def test_bad_pipeline_option_is_config_error_at_every_entry(key: str, value: Any) -> None:
    """A bad pipeline option is a ConfigError naming the pipeline and key at each entry."""

    def flow() -> None:
        return None

    with pytest.raises(ConfigError) as info:
        pipeline(**{key: value})(flow)
    assert "'flow'" in str(info.value) and key in str(info.value)
    good = pipeline(flow)
    with pytest.raises(ConfigError) as info:
        good.with_options(**{key: value})
    assert "'flow'" in str(info.value) and key in str(info.value)
    with pytest.raises(ConfigError):
        good.configure(**{key: value})


def test_good_pipeline_options_are_accepted() -> None:
    """An execution-mode value string, max_concurrency None or >= 1 pass."""

    @pipeline(execution_mode="fail_fast", max_concurrency=None)
    def flow() -> None:
        return None

    flow.with_options(execution_mode=ExecutionMode.STOP_ON_FAILURE, max_concurrency=3)


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ("steps: {use: {timeout: -1}}", "timeout"),
        ("steps: {use: {step_operator: 3}}", "step_operator"),
        ("steps: {use: {retry: 3}}", "retry"),
        ("max_concurrency: 0", "max_concurrency"),
        ("run_name: 'a{b'", "run_name"),
    ],
)
async def test_bad_yaml_option_is_config_error_before_a_run(
    memory_stack: Any, tmp_path: Path, block: str, key: str
) -> None:
    """A bad value in a YAML run configuration is a ConfigError naming the file and key."""
    ran: list[str] = []

    @step
    def use() -> None:
        ran.append("use")

    @pipeline(enable_cache=False)
    def flow() -> None:
        use()

    path = tmp_path / "run_cfg.yaml"
    path.write_text(block + "\n")
    with pytest.raises(ConfigError) as info:
        await flow.with_options(config_path=str(path)).run()
    assert "run_cfg.yaml" in str(info.value) and key in str(info.value)
    assert ran == [] and listed_runs() == []


def test_bad_max_threads_does_not_break_import(tmp_path: Path) -> None:
    """`FLOWCORE_MAX_THREADS=abc` lets `import flowcore` succeed."""
    env = {**os.environ, "FLOWCORE_MAX_THREADS": "abc", "FLOWCORE_HOME": str(tmp_path),
           "PYTHONPATH": str(Path(flowcore.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", "import flowcore"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("raw", ["abc", "0", "-3", "1.5"])
def test_bad_max_threads_is_config_error_when_read(monkeypatch: Any, raw: str) -> None:
    """A FLOWCORE_MAX_THREADS that is not an integer >= 1 is a ConfigError naming it."""
    from flowcore._threads import max_threads

    monkeypatch.setenv("FLOWCORE_MAX_THREADS", raw)
    with pytest.raises(ConfigError, match="FLOWCORE_MAX_THREADS"):
        max_threads()
    monkeypatch.setenv("FLOWCORE_MAX_THREADS", "8")
    assert max_threads() == 8


async def test_bad_enforce_flag_is_config_error_at_compile(monkeypatch: Any) -> None:
    """`FLOWCORE_ENFORCE_TYPE_ANNOTATIONS=maybe` is a ConfigError naming the variable."""

    @step
    def one() -> int:
        return 1

    @pipeline
    def flow() -> None:
        one()

    monkeypatch.setenv("FLOWCORE_ENFORCE_TYPE_ANNOTATIONS", "maybe")
    with pytest.raises(ConfigError, match="FLOWCORE_ENFORCE_TYPE_ANNOTATIONS"):
        flow.compile()


def test_bad_single_step_flag_is_config_error(monkeypatch: Any) -> None:
    """`FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK=maybe` is a ConfigError naming the variable."""
    monkeypatch.setenv("FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK", "maybe")
    with pytest.raises(ConfigError, match="FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK"):
        step(_plain)()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("YES", True), ("On", True), ("1", True),
     ("false", False), ("No", False), ("OFF", False), ("0", False), ("", False)],
)
def test_boolean_environment_spellings(monkeypatch: Any, raw: str, expected: bool) -> None:
    """The usual true/false spellings of a flag are accepted in any case."""
    monkeypatch.setenv("FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK", raw)
    assert env_flag("FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK") is expected


# -- §12.18 run-name templates ----------------------------------------------------------------

_BAD_TEMPLATES = ["a{b", "a}b", "{date:%Y}", "{date!r}", "{date.year}", "{}"]


@pytest.mark.parametrize("template", _BAD_TEMPLATES)
def test_invalid_run_name_template_is_config_error_at_with_options(template: str) -> None:
    """A lone brace, a format spec, a conversion or a non-name is a ConfigError naming it."""

    @pipeline
    def flow() -> None:
        return None

    with pytest.raises(ConfigError) as info:
        flow.with_options(run_name=template)
    assert template in str(info.value) and "'flow'" in str(info.value)


@pytest.mark.parametrize("template", _BAD_TEMPLATES)
def test_format_run_name_raises_config_error_not_value_error(template: str) -> None:
    """Naming a run with an invalid template is a ConfigError, never a raw ValueError."""
    with pytest.raises(ConfigError) as info:
        format_run_name(template, pipeline_name="flow", run_id="r1",
                        now=datetime.now(UTC))
    assert template in str(info.value)


async def test_unknown_placeholder_is_config_error_before_a_run(memory_stack: Any) -> None:
    """A placeholder nobody provides is a ConfigError naming it, and no run is recorded."""

    @step
    def one() -> int:
        return 1

    @pipeline(enable_cache=False)
    def flow() -> None:
        one()

    with pytest.raises(ConfigError, match="nope"):
        await flow.with_options(run_name="x-{nope}").run()
    assert listed_runs() == []


async def test_doubled_braces_are_literal_in_run_names(memory_stack: Any) -> None:
    """`{{` and `}}` in a run-name template are literal braces."""

    @step
    def one() -> int:
        return 1

    @pipeline(enable_cache=False)
    def flow() -> None:
        one()

    run = await flow.with_options(run_name="x{{y}}-{pipeline_name}").run()
    assert run.name == "x{y}-flow"


# -- §12.19 a pipeline that calls itself ------------------------------------------------------


@step
def _leaf() -> int:
    return 1


@pipeline
def _selfish() -> None:
    _leaf()
    _selfish()


@pipeline
def _ping() -> None:
    _leaf()
    _pong()


@pipeline
def _pong() -> None:
    _ping()


async def test_pipeline_calling_itself_is_a_definition_error(memory_stack: Any) -> None:
    """A pipeline calling itself is a PipelineDefinitionError naming `a -> a`, no run recorded."""
    with pytest.raises(PipelineDefinitionError) as info:
        await _selfish.run()
    assert "_selfish -> _selfish" in str(info.value)
    assert listed_runs() == []


def test_pipeline_calling_itself_through_another_names_the_chain() -> None:
    """`a -> b -> a` through composition is a PipelineDefinitionError naming the chain."""
    with pytest.raises(PipelineDefinitionError) as info:
        _ping.compile()
    assert "_ping -> _pong -> _ping" in str(info.value)
    with pytest.raises(PipelineDefinitionError) as info:
        _pong.with_options(enable_cache=False).compile()
    assert "_pong -> _ping -> _pong" in str(info.value)


def test_composing_one_pipeline_twice_is_not_recursion() -> None:
    """An inner pipeline called twice in a row (not inside itself) still inlines both times."""

    @pipeline
    def inner() -> int:
        return _leaf()  # type: ignore[no-any-return]

    @pipeline
    def outer() -> None:
        inner()
        inner()

    graph = outer.compile()
    assert [n.id for n in graph.nodes] == ["_leaf", "_leaf_2"]


# -- every exception class in flowcore/exceptions.py ------------------------------------------

_KNOWN_ELSEWHERE: set[str] = set()


def _exception_classes_outside_exceptions_py() -> list[str]:
    root = Path(flowcore.__file__).resolve().parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "exceptions.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]
            if any(b.endswith(("Error", "Exception")) for b in bases):
                found.append(node.name)
    return found


def test_exception_classes_live_in_exceptions_py() -> None:
    """No module but flowcore/exceptions.py defines an exception class (known leftovers aside)."""
    assert set(_exception_classes_outside_exceptions_py()) <= _KNOWN_ELSEWHERE


def test_moved_exceptions_keep_their_old_import_paths() -> None:
    """SyncCallOnLoopError and CacheKeyError are the exceptions.py classes under old names too."""
    from flowcore import _canonical, _pipeline, exceptions

    assert _pipeline.SyncCallOnLoopError is exceptions.SyncCallOnLoopError
    assert _canonical.CacheKeyError is exceptions.CacheKeyError
    assert issubclass(exceptions.SyncCallOnLoopError, FlowcoreError)
    assert issubclass(exceptions.SyncCallOnLoopError, RuntimeError)
    assert issubclass(exceptions.CacheKeyError, FlowcoreError)
