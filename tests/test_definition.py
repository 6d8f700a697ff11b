"""Defining steps and pipelines: bodies, options, outputs, type checks, IDs, graph shape, errors."""

import asyncio
import threading
from typing import TYPE_CHECKING, Annotated

import pytest

from flowcore import (
    Client,
    ConfigError,
    OutputHandle,
    PipelineDefinitionError,
    RunFailedError,
    StepInputError,
    StepOutputError,
    StepStatus,
    pipeline,
    step,
)

if TYPE_CHECKING:  # only for string annotations that cannot be resolved at run time
    from decimal import Decimal

# -- helpers ----------------------------------------------------------------------------------


def edges_of(graph) -> set[tuple[str, str, str]]:
    """The compiled graph's edges as a set of (upstream, downstream, kind)."""
    return {tuple(e) for e in graph.edges}


def node_ids(graph) -> list[str]:
    """The compiled graph's node IDs in its order."""
    return [n.id for n in graph.nodes]


def listed_runs() -> list:
    """Every run recorded on the active stack."""
    return Client().list_pipeline_runs()


# -- sync and async bodies --------------------------------------------------------------------


async def test_sync_step_runs_in_worker_thread_and_async_step_on_loop_thread(memory_stack):
    """A plain def step runs off the loop thread; an async def step runs on the loop thread."""
    seen: dict[str, threading.Thread] = {}

    @step(enable_cache=False)
    def sync_body() -> None:
        seen["sync"] = threading.current_thread()

    @step(enable_cache=False)
    async def async_body() -> None:
        seen["async"] = threading.current_thread()

    @pipeline
    def p():
        sync_body()
        async_body()

    loop_thread = threading.current_thread()
    run = await p.run()
    assert run.steps["sync_body"].status is StepStatus.COMPLETED
    assert seen["sync"] is not loop_thread
    assert seen["async"] is loop_thread


async def test_sync_step_does_not_block_the_loop(memory_stack):
    """A blocking sync step leaves the event loop free to run an async step concurrently."""
    import time

    order: list[str] = []

    @step(enable_cache=False)
    def blocking() -> None:
        time.sleep(0.5)
        order.append("blocking_done")

    @step(enable_cache=False)
    async def quick() -> None:
        await asyncio.sleep(0.01)
        order.append("quick_done")

    @pipeline
    def p():
        blocking()
        quick()

    await p.run()
    assert order == ["quick_done", "blocking_done"]


def test_entrypoint_calls_the_raw_function(memory_stack):
    """`entrypoint` returns the function's own value without recording any run."""
    calls: list[tuple[int, int]] = []

    @step
    def add(a: int, b: int) -> int:
        calls.append((a, b))
        return a + b

    assert add.entrypoint(2, 3) == 5
    assert add.entrypoint(a=1, b=1) == 2
    assert calls == [(2, 3), (1, 1)]
    # The raw function does no type validation either.
    assert add.entrypoint("x", "y") == "xy"


async def test_entrypoint_of_async_step_returns_a_coroutine(memory_stack):
    """`entrypoint` of an async step is the raw coroutine function."""

    @step
    async def double(x: int) -> int:
        return 2 * x

    coro = double.entrypoint(4)
    assert asyncio.iscoroutine(coro)
    assert await coro == 8


# -- configure / with_options -----------------------------------------------------------------


async def test_step_configure_changes_in_place_and_returns_same_step(memory_stack):
    """`configure` returns the very same step and its new option takes effect."""
    calls: list[int] = []

    @step
    def counted() -> int:
        calls.append(1)
        return 1

    @pipeline
    def p():
        counted()

    same = counted.configure(enable_cache=False)
    assert same is counted
    await p.run()
    await p.run()
    assert len(calls) == 2  # caching is off, so the body ran twice


async def test_step_with_options_returns_changed_copy(memory_stack):
    """`with_options` returns a new step with the option; the original keeps its behaviour."""
    calls: list[str] = []

    @step
    def counted(tag: str) -> str:
        calls.append(tag)
        return tag

    uncached = counted.with_options(enable_cache=False)
    assert uncached is not counted

    @pipeline
    def p_orig():
        counted("orig")

    @pipeline
    def p_copy():
        uncached("copy")

    for _ in range(2):
        await p_orig.run()
        await p_copy.run()
    assert calls.count("orig") == 1  # original still caches
    assert calls.count("copy") == 2  # the copy does not


async def test_step_with_options_hook_does_not_leak_to_original(memory_stack):
    """A hook added through `with_options` runs only for the copy."""
    fired: list[str] = []

    def hook(step_name):
        fired.append(step_name)

    @step(enable_cache=False)
    def s() -> int:
        return 1

    hooked = s.with_options(on_success=hook)

    @pipeline
    def p():
        s(step_name="plain")
        hooked(step_name="hooked")

    await p.run()
    assert fired == ["hooked"]


async def test_pipeline_configure_in_place_and_with_options_copy(memory_stack):
    """Pipeline `configure` mutates and returns itself; `with_options` returns a copy."""

    @step(enable_cache=False)
    def s() -> int:
        return 1

    @pipeline
    def p():
        s()

    assert p.configure(run_name="configured_{run_id}") is p
    copy = p.with_options(run_name="copy_{run_id}")
    assert copy is not p
    r_copy = await copy.run()
    r_orig = await p.run()
    assert r_copy.name == f"copy_{r_copy.id}"
    assert r_orig.name == f"configured_{r_orig.id}"


async def test_pipeline_with_options_enable_cache_leaves_original(memory_stack):
    """`with_options(enable_cache=False)` disables the cache only for the copy."""
    calls: list[int] = []

    @step
    def counted() -> int:
        calls.append(1)
        return 1

    @pipeline
    def p():
        counted()

    nocache = p.with_options(enable_cache=False)
    await p.run()
    await p.run()
    assert len(calls) == 1
    r = await nocache.run()
    assert len(calls) == 2
    assert r.steps["counted"].status is StepStatus.COMPLETED
    r = await p.run()
    assert r.steps["counted"].status is StepStatus.CACHED


# -- outputs ----------------------------------------------------------------------------------


async def test_output_rules(memory_stack):
    """Outputs follow the return annotation and return statements as API.md section 1 says."""
    handles: dict[str, object] = {}

    @step
    def returns_none() -> None:
        return None

    @step
    def no_return(x: int):
        _ = x

    @step
    def single() -> int:
        return 7

    @step
    def two() -> tuple[int, str]:
        return 1, "b"

    @step
    def parenthesised():
        return (1, 2, 3)

    @step
    def tuple_variable() -> tuple[int, int]:
        t = (3, 4)
        return t

    @step
    def named() -> Annotated[float, "accuracy"]:
        return 0.9

    @step
    def named_pair() -> tuple[Annotated[int, "a"], Annotated[str, "b"]]:
        return 1, "x"

    @pipeline(enable_cache=False)
    def p():
        handles["returns_none"] = returns_none()
        handles["no_return"] = no_return(1)
        handles["single"] = single()
        handles["two"] = two()
        handles["parenthesised"] = parenthesised()
        handles["tuple_variable"] = tuple_variable()
        handles["named"] = named()
        handles["named_pair"] = named_pair()

    run = await p.run()
    outs = {sid: set(sr.outputs) for sid, sr in run.steps.items()}
    assert outs == {
        "returns_none": set(),
        "no_return": set(),
        "single": {"output"},
        "two": {"output_0", "output_1"},
        "parenthesised": {"output_0", "output_1", "output_2"},
        "tuple_variable": {"output"},
        "named": {"accuracy"},
        "named_pair": {"a", "b"},
    }
    assert isinstance(handles["single"], OutputHandle)
    assert isinstance(handles["tuple_variable"], OutputHandle)
    assert isinstance(handles["two"], tuple) and len(handles["two"]) == 2
    assert all(isinstance(h, OutputHandle) for h in handles["two"])
    assert isinstance(handles["named_pair"], tuple) and len(handles["named_pair"]) == 2
    assert run.steps["tuple_variable"].output.load() == (3, 4)
    assert run.steps["two"].outputs["output_1"].load() == "b"
    assert run.steps["named"].outputs["accuracy"].load() == 0.9
    assert run.steps["named_pair"].outputs["b"].load() == "x"


async def test_multiple_output_handles_feed_downstream_steps(memory_stack):
    """Each handle of a multi-output step carries its own value downstream."""

    @step
    def split() -> tuple[int, str]:
        return 5, "five"

    @step
    def show(n: int, word: str) -> str:
        return f"{n}:{word}"

    @pipeline(enable_cache=False)
    def p():
        n, word = split()
        show(n, word)

    run = await p.run()
    assert run.steps["show"].output.load() == "5:five"


async def test_mixed_returns_are_one_tuple_output(memory_stack):
    """A function that returns a tuple literal in one branch and a variable in another has one
    output."""

    @step
    def mixed(flag: bool) -> tuple:
        if flag:
            return 1, 2
        t = (3, 4)
        return t

    @pipeline(enable_cache=False)
    def p():
        mixed(True)

    run = await p.run()
    assert set(run.steps["mixed"].outputs) == {"output"}
    assert run.steps["mixed"].output.load() == (1, 2)


async def test_annotated_output_name_survives_unresolvable_input_annotation(memory_stack):
    """An output keeps its Annotated name under postponed (string) annotations even if an
    input's annotation names a type imported only for type checking."""

    # Quoted as `from __future__ import annotations` would store them.
    @step(enable_cache=False)
    def scored(x: "Decimal | None" = None) -> 'Annotated[float, "accuracy"]':
        return 0.5

    @pipeline
    def p():
        scored()

    run = await p.run()
    assert set(run.steps["scored"].outputs) == {"accuracy"}


# -- type validation --------------------------------------------------------------------------


async def test_wrong_input_type_fails_step_with_step_input_error(stack):
    """An upstream value of the wrong type fails the step with StepInputError before its body."""
    ran: list[str] = []

    @step
    def make_text() -> str:
        return "not a number"

    @step
    def consume(count: int) -> int:
        ran.append("consume")
        return count

    @pipeline(enable_cache=False)
    def p():
        consume(make_text())

    with pytest.raises(RunFailedError) as info:
        await p.run()
    cause = info.value.__cause__
    assert isinstance(cause, StepInputError)
    assert "consume" in str(cause)
    assert "count" in str(cause)
    assert ran == []
    sr = info.value.run.steps["consume"]
    assert sr.status is StepStatus.FAILED
    assert sr.error is not None and sr.error.type == "StepInputError"


async def test_wrong_plain_parameter_type_is_step_input_error(memory_stack):
    """A plain parameter of the wrong type is a StepInputError naming the parameter."""
    ran: list[str] = []

    @step
    def consume(items: list[int]) -> int:
        ran.append("x")
        return len(items)

    @pipeline(enable_cache=False)
    def p():
        consume(items=["a", "b"])

    with pytest.raises((RunFailedError, StepInputError)) as info:
        await p.run()
    err = info.value
    cause = err.__cause__ if isinstance(err, RunFailedError) else err
    assert isinstance(cause, StepInputError)
    assert "items" in str(cause) and "consume" in str(cause)
    assert ran == []


async def test_wrong_return_type_fails_step_with_step_output_error(stack):
    """A returned value not matching the annotation fails the step with StepOutputError."""

    @step
    def liar() -> int:
        return "seven"  # type: ignore[return-value]

    @step
    def after_liar(x: int) -> int:
        return x

    @pipeline(enable_cache=False)
    def p():
        after_liar(liar())

    with pytest.raises(RunFailedError) as info:
        await p.run()
    assert isinstance(info.value.__cause__, StepOutputError)
    assert "liar" in str(info.value.__cause__)
    run = info.value.run
    assert run.steps["liar"].status is StepStatus.FAILED
    assert run.steps["liar"].outputs == {}
    assert run.steps["after_liar"].status is StepStatus.SKIPPED


async def test_enforce_type_annotations_makes_unannotated_step_a_definition_error(
    stack, monkeypatch
):
    """With FLOWCORE_ENFORCE_TYPE_ANNOTATIONS=true an unannotated step fails the definition."""
    monkeypatch.setenv("FLOWCORE_ENFORCE_TYPE_ANNOTATIONS", "true")
    ran: list[str] = []

    @step
    def fine() -> None:
        ran.append("fine")

    @step
    def loose(x):
        ran.append("loose")
        return x

    @pipeline(enable_cache=False)
    def p():
        fine()
        loose(1)

    with pytest.raises(PipelineDefinitionError) as info:
        await p.run()
    assert "loose" in str(info.value)
    assert ran == []
    assert listed_runs() == []


async def test_enforce_type_annotations_accepts_fully_annotated_steps(memory_stack, monkeypatch):
    """With the flag on, a fully annotated pipeline still runs."""
    monkeypatch.setenv("FLOWCORE_ENFORCE_TYPE_ANNOTATIONS", "true")

    @step
    def typed(x: int) -> int:
        return x + 1

    @pipeline(enable_cache=False)
    def p():
        typed(1)

    run = await p.run()
    assert run.steps["typed"].output.load() == 2


async def test_unannotated_step_runs_when_flag_is_off(memory_stack):
    """Without the flag an unannotated step is fine."""

    @step
    def loose(x):
        return x

    @pipeline(enable_cache=False)
    def p():
        loose(3)

    run = await p.run()
    assert run.steps["loose"].output.load() == 3


# -- invocation IDs ---------------------------------------------------------------------------


async def test_invocation_ids(memory_stack):
    """IDs are the step name, `step_name=`, `id=`, and name_2, name_3 for repeats."""

    @step
    def my_step() -> int:
        return 1

    @pipeline(enable_cache=False)
    def p():
        my_step()
        my_step()
        my_step(step_name="first_step")
        my_step(id="second_step")
        my_step()

    assert node_ids(p.compile()) == [
        "my_step", "my_step_2", "first_step", "second_step", "my_step_3",
    ]
    run = await p.run()
    assert set(run.steps) == {"my_step", "my_step_2", "first_step", "second_step", "my_step_3"}
    for sid, sr in run.steps.items():
        assert sr.name == sid


# -- after= -----------------------------------------------------------------------------------


def _ordered_steps(order: list[str]):
    """A slow and a fast async step that record when they finish."""

    @step(enable_cache=False)
    async def slow() -> int:
        await asyncio.sleep(0.2)
        order.append("slow")
        return 1

    @step(enable_cache=False)
    async def fast() -> None:
        order.append("fast")

    return slow, fast


async def test_after_by_handle(memory_stack):
    """`after=handle` makes an order-only edge and the step waits for it."""
    order: list[str] = []
    slow, fast = _ordered_steps(order)

    @pipeline
    def p():
        h = slow()
        fast(after=h)

    assert ("slow", "fast", "order") in edges_of(p.compile())
    await p.run()
    assert order == ["slow", "fast"]


async def test_after_by_list_of_handles(memory_stack):
    """`after=[h1, h2]` waits for every listed invocation."""
    order: list[str] = []
    slow, fast = _ordered_steps(order)

    @step(enable_cache=False)
    async def slower() -> int:
        await asyncio.sleep(0.3)
        order.append("slower")
        return 2

    @pipeline
    def p():
        a = slow()
        b = slower()
        fast(after=[a, b])

    assert {("slow", "fast", "order"), ("slower", "fast", "order")} <= edges_of(p.compile())
    await p.run()
    assert order == ["slow", "slower", "fast"]


async def test_after_by_invocation_id(memory_stack):
    """`after="id"` orders by invocation ID."""
    order: list[str] = []
    slow, fast = _ordered_steps(order)

    @pipeline
    def p():
        slow(step_name="warmup")
        fast(after="warmup")

    assert ("warmup", "fast", "order") in edges_of(p.compile())
    await p.run()
    assert order == ["slow", "fast"]


async def test_after_may_name_an_id_declared_later(memory_stack):
    """`after="id"` may name an invocation declared later in the pipeline function."""
    order: list[str] = []
    slow, fast = _ordered_steps(order)

    @pipeline
    def p():
        fast(after="later")
        slow(step_name="later")

    assert ("later", "fast", "order") in edges_of(p.compile())
    await p.run()
    assert order == ["slow", "fast"]


async def test_after_on_a_no_output_step_handle(memory_stack):
    """A handle of a step without outputs still works as an `after=` dependency."""
    order: list[str] = []

    @step(enable_cache=False)
    async def side_effect() -> None:
        await asyncio.sleep(0.1)
        order.append("side_effect")

    @step(enable_cache=False)
    async def report() -> None:
        order.append("report")

    @pipeline
    def p():
        h = side_effect()
        report(after=h)

    await p.run()
    assert order == ["side_effect", "report"]


# -- composition ------------------------------------------------------------------------------


@step
def training_data_loader_step() -> list[int]:
    return [1, 2, 3]


@step
def test_data_loader_step() -> list[int]:
    """The seed's test-data loader step (a step, not a pytest test)."""
    return [10, 20]


test_data_loader_step.__test__ = False  # the seed's name; not a pytest test


@step
def preprocessing_step(data: list[int]) -> list[int]:
    return [x * 2 for x in data]


@step
def train_model(data: list[int]) -> int:
    return sum(data)


@step
def evaluate_model(model: int, data: list[int]) -> float:
    return model / sum(data)


@pipeline
def data_pipeline(mode: str):
    if mode == "train":
        data = training_data_loader_step()
    else:
        data = test_data_loader_step()
    processed_data = preprocessing_step(data)
    return processed_data


@pipeline(enable_cache=False)
def training_pipeline():
    training_data = data_pipeline(mode="train")
    model = train_model(data=training_data)
    test_data = data_pipeline(mode="test")
    evaluate_model(model=model, data=test_data)


async def test_composition_inlines_inner_pipeline_steps(memory_stack):
    """The seed's data_pipeline/training_pipeline example inlines steps with plain IDs."""
    graph = training_pipeline.compile()
    assert node_ids(graph) == [
        "training_data_loader_step",
        "preprocessing_step",
        "train_model",
        "test_data_loader_step",
        "preprocessing_step_2",
        "evaluate_model",
    ]
    edges = edges_of(graph)
    assert ("preprocessing_step", "train_model", "data") in edges
    assert ("preprocessing_step_2", "evaluate_model", "data") in edges
    assert ("train_model", "evaluate_model", "data") in edges
    run = await training_pipeline.run()
    assert run.pipeline_name == "training_pipeline"
    assert run.steps["preprocessing_step_2"].name == "preprocessing_step_2"
    assert run.steps["train_model"].output.load() == 12
    assert run.steps["evaluate_model"].output.load() == pytest.approx(12 / 60)
    assert len(listed_runs()) == 1  # the inner pipeline made no run of its own


async def test_composition_returns_what_inner_function_returns(memory_stack):
    """An inner pipeline's return value (here a dict of handles and a constant) is passed
    through."""
    got: dict[str, object] = {}

    @step
    def one() -> int:
        return 1

    @step
    def two() -> int:
        return 2

    @step
    def add(a: int, b: int) -> int:
        return a + b

    @pipeline
    def inner():
        return {"a": one(), "b": two()}, "marker"

    @pipeline(enable_cache=False)
    def outer():
        handles, marker = inner()
        got["marker"] = marker
        got["handles"] = handles
        add(handles["a"], handles["b"])

    run = await outer.run()
    assert got["marker"] == "marker"
    assert all(isinstance(h, OutputHandle) for h in got["handles"].values())
    assert run.steps["add"].output.load() == 3


# -- fan-out / fan-in -------------------------------------------------------------------------


async def test_fan_out_loop_and_fan_in_list(memory_stack):
    """A loop fans out one invocation per iteration; a list of handles fans them in."""

    @step
    def process_chunk(i: int) -> int:
        return i * i

    @step
    def combine_results(results: list[int]) -> int:
        return sum(results)

    @pipeline(enable_cache=False)
    def fan_pipeline():
        results = []
        for i in range(5):
            results.append(process_chunk(i))
        combine_results(results)

    graph = fan_pipeline.compile()
    chunks = ["process_chunk", "process_chunk_2", "process_chunk_3", "process_chunk_4",
              "process_chunk_5"]
    assert node_ids(graph) == [*chunks, "combine_results"]
    assert {(c, "combine_results", "data") for c in chunks} <= edges_of(graph)
    run = await fan_pipeline.run()
    assert run.steps["combine_results"].output.load() == 0 + 1 + 4 + 9 + 16


async def test_fan_in_dict_and_tuple_of_handles(memory_stack):
    """Dicts and tuples of handles are resolved to dicts and tuples of values, in order."""

    @step
    def num(i: int) -> int:
        return i

    @step
    def from_dict(d: dict[str, int]) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(d.items()))

    @step
    def from_tuple(t: tuple[int, int, int]) -> list[int]:
        assert isinstance(t, tuple)
        return list(t)

    @pipeline(enable_cache=False)
    def p():
        a, b, c = num(1), num(2), num(3)
        from_dict({"x": a, "y": b, "z": 99})
        from_tuple((c, b, a))

    run = await p.run()
    assert run.steps["from_dict"].output.load() == "x=1,y=2,z=99"
    assert run.steps["from_tuple"].output.load() == [3, 2, 1]


async def test_python_if_shapes_the_graph(memory_stack):
    """Ordinary Python `if mode == "train"` chooses which steps are in the graph."""

    @step
    def load() -> int:
        return 1

    @step
    def train(x: int) -> int:
        return x + 1

    @step
    def evaluate(x: int) -> int:
        return x - 1

    @pipeline(enable_cache=False)
    def p(mode: str = "train"):
        data = load()
        if mode == "train":
            train(data)
        else:
            evaluate(data)

    assert node_ids(p.compile(mode="train")) == ["load", "train"]
    assert node_ids(p.compile(mode="eval")) == ["load", "evaluate"]
    run = await p.run(mode="eval")
    assert set(run.steps) == {"load", "evaluate"}
    run = await p.run()
    assert set(run.steps) == {"load", "train"}


# -- compile ----------------------------------------------------------------------------------


def test_compile_returns_graph_with_nodes_edges_and_mermaid(memory_stack):
    """`compile(**params)` gives nodes in declaration order, data vs order edges and Mermaid."""
    ran: list[str] = []

    @step
    def load(n: int) -> list[int]:
        ran.append("load")
        return list(range(n))

    @step
    def train(data: list[int]) -> int:
        ran.append("train")
        return len(data)

    @step
    def report() -> None:
        ran.append("report")

    @step
    def deploy() -> None:
        ran.append("deploy")

    @pipeline
    def p(n: int):
        data = load(n)
        acc = train(data)
        report(after=[acc])
        deploy(after="report")

    graph = p.compile(n=3)
    assert node_ids(graph) == ["load", "train", "report", "deploy"]
    assert edges_of(graph) == {
        ("load", "train", "data"),
        ("train", "report", "order"),
        ("report", "deploy", "order"),
    }
    mermaid = graph.to_mermaid()
    for nid in ("load", "train", "report", "deploy"):
        assert nid in mermaid
    again = p.compile(n=3)
    assert node_ids(again) == node_ids(graph)
    assert list(again.edges) == list(graph.edges)
    assert ran == []  # compiling runs no step
    assert listed_runs() == []


def test_compile_order_is_declaration_order_not_alphabetical(memory_stack):
    """Independent nodes keep the order they were declared in."""

    @step
    def zeta() -> None: ...

    @step
    def alpha() -> None: ...

    @step
    def mid() -> None: ...

    @pipeline
    def p():
        zeta()
        alpha()
        mid()

    assert node_ids(p.compile()) == ["zeta", "alpha", "mid"]


# -- definition errors ------------------------------------------------------------------------


def _recording_step(ran: list[str]):
    @step(enable_cache=False)
    def record() -> int:
        ran.append("record")
        return 1

    return record


async def test_duplicate_explicit_id_is_definition_error(stack):
    """Two invocations with the same explicit ID are a PipelineDefinitionError before any run."""
    ran: list[str] = []
    record = _recording_step(ran)

    @pipeline
    def p():
        record(step_name="same")
        record(step_name="same")

    with pytest.raises(PipelineDefinitionError) as info:
        await p.run()
    assert "same" in str(info.value)
    assert ran == []
    assert listed_runs() == []


async def test_explicit_id_clashing_with_generated_id_is_definition_error(memory_stack):
    """An explicit ID equal to an earlier automatic ID is a duplicate too."""
    ran: list[str] = []
    record = _recording_step(ran)

    @pipeline
    def p():
        record()
        record(step_name="record")

    with pytest.raises(PipelineDefinitionError):
        await p.run()
    assert ran == []


async def test_unknown_after_id_suggests_closest_name(stack):
    """`after=` naming an unknown ID is a PipelineDefinitionError suggesting the closest ID."""
    ran: list[str] = []
    record = _recording_step(ran)

    @pipeline
    def p():
        record(step_name="report")
        record(step_name="deploy", after="reprot")

    with pytest.raises(PipelineDefinitionError) as info:
        await p.run()
    msg = str(info.value)
    assert "reprot" in msg
    assert "did you mean 'report'?" in msg
    assert ran == []
    assert listed_runs() == []


def test_unknown_after_id_raised_from_sync_call(memory_stack):
    """The same definition error is raised directly from a synchronous `p()`."""
    ran: list[str] = []
    record = _recording_step(ran)

    @pipeline
    def p():
        record(after="nowhere")

    with pytest.raises(PipelineDefinitionError):
        p()
    assert ran == []
    assert listed_runs() == []


async def test_cycle_via_after_ids_is_definition_error_naming_the_cycle(stack):
    """A cycle built from `after=` IDs is a PipelineDefinitionError naming its members."""
    ran: list[str] = []
    record = _recording_step(ran)

    @pipeline
    def p():
        record(step_name="start")
        record(step_name="alpha", after=["start", "gamma"])
        record(step_name="beta", after="alpha")
        record(step_name="gamma", after="beta")

    with pytest.raises(PipelineDefinitionError) as info:
        await p.run()
    msg = str(info.value)
    assert "cycle" in msg.lower()
    for nid in ("alpha", "beta", "gamma"):
        assert nid in msg
    assert "start" not in msg  # not part of the cycle
    assert ran == []
    assert listed_runs() == []


async def test_self_after_is_definition_error(memory_stack):
    """A step that must run after itself is a PipelineDefinitionError."""
    ran: list[str] = []
    record = _recording_step(ran)

    @pipeline
    def p():
        record(step_name="loop", after="loop")

    with pytest.raises(PipelineDefinitionError):
        await p.run()
    assert ran == []


async def test_hook_with_unknown_parameter_is_definition_error(stack):
    """A hook asking for a parameter flowcore cannot give is a PipelineDefinitionError."""
    ran: list[str] = []

    def bad_hook(step_name, mystery):
        ran.append("hook")

    @step(enable_cache=False, on_success=bad_hook)
    def s() -> int:
        ran.append("s")
        return 1

    @step(enable_cache=False)
    def first() -> int:
        ran.append("first")
        return 1

    @pipeline
    def p():
        first()
        s()

    with pytest.raises(PipelineDefinitionError) as info:
        await p.run()
    assert "mystery" in str(info.value)
    assert ran == []
    assert listed_runs() == []


def test_pipeline_level_hook_with_unknown_parameter_raised_from_sync_call(memory_stack):
    """A bad pipeline-level hook is a PipelineDefinitionError from `p()` before any step runs."""
    ran: list[str] = []
    record = _recording_step(ran)

    def bad_hook(whatever):
        ran.append("hook")

    @pipeline(on_failure=bad_hook)
    def p():
        record()

    with pytest.raises(PipelineDefinitionError) as info:
        p()
    assert "whatever" in str(info.value)
    assert ran == []
    assert listed_runs() == []


async def test_no_output_handle_passed_as_data_is_definition_error(stack):
    """Passing a no-output step's handle as data is a PipelineDefinitionError."""
    ran: list[str] = []

    @step(enable_cache=False)
    def nothing() -> None:
        ran.append("nothing")

    @step(enable_cache=False)
    def consume(x: int) -> int:
        ran.append("consume")
        return x

    @pipeline
    def p():
        h = nothing()
        consume(h)

    with pytest.raises(PipelineDefinitionError) as info:
        await p.run()
    assert "nothing" in str(info.value)
    assert ran == []
    assert listed_runs() == []


def test_unknown_step_option_is_config_error():
    """An unknown `@step` keyword is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="enable_cach"):

        @step(enable_cach=False)
        def s() -> None: ...


def test_unknown_pipeline_option_is_config_error():
    """An unknown `@pipeline` keyword is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="retries"):

        @pipeline(retries=3)
        def p(): ...


def test_unknown_option_in_configure_and_with_options_is_config_error():
    """`configure` and `with_options` reject unknown options too."""

    @step
    def s() -> None: ...

    @pipeline
    def p():
        s()

    with pytest.raises(ConfigError):
        s.configure(bogus=1)
    with pytest.raises(ConfigError):
        s.with_options(bogus=1)
    with pytest.raises(ConfigError):
        p.configure(bogus=1)
    with pytest.raises(ConfigError):
        p.with_options(bogus=1)
