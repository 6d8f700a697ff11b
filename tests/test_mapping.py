"""Dynamic fan-out (API.md section 8): `.map()` and `.product()` expand at run time into one
invocation per element, each with its own StepRun, cache entry, retries and hooks; results come
back in order for a fan-in step. Runs on both the in-memory and the SQLite stack."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from flowcore import (
    AsyncClient,
    ExecutionMode,
    PipelineDefinitionError,
    RunFailedError,
    RunStatus,
    Stack,
    StepInputError,
    StepRetryConfig,
    StepStatus,
    get_step_context,
    pipeline,
    step,
    unmapped,
)


def element_names(run: Any, prefix: str) -> list[str]:
    """The element invocation IDs `prefix[0]`, `prefix[1]`, ... of a run, in index order."""
    names = [n for n in run.steps if n.startswith(prefix + "[")]
    return sorted(names, key=lambda n: int(n[len(prefix) + 1:-1]))


# -- basic fan-out / fan-in ------------------------------------------------------------------


@step
def make_chunks(n: int) -> list[int]:
    return list(range(n))


@step(enable_cache=False)
async def process_chunk(chunk: int) -> int:
    # Later elements finish first: results must still come back in element order.
    await asyncio.sleep(0.02 * (5 - chunk % 5))
    return chunk * chunk


@step(enable_cache=False)
def combine(results: list[int]) -> list[int]:
    return list(results)


@pipeline
def fan_out(n: int = 5) -> None:
    combine(process_chunk.map(make_chunks(n)))


async def test_map_makes_one_invocation_per_element_with_results_in_order(stack: Stack) -> None:
    """`.map()` over an upstream output runs `process_chunk[0]`...`[n-1]`, each with its own
    completed StepRun and parameters, and the fan-in step receives the results in order; the
    stored run has the same step runs."""
    run = await fan_out.run(n=5)
    assert run.status is RunStatus.COMPLETED
    names = element_names(run, "process_chunk")
    assert names == [f"process_chunk[{k}]" for k in range(5)]
    for k, name in enumerate(names):
        sr = run.steps[name]
        assert sr.name == name
        assert sr.status is StepStatus.COMPLETED
        assert sr.attempts == 1
        assert sr.config.parameters["chunk"] == k
        assert sr.output.load() == k * k
    assert len({run.steps[n].id for n in names}) == 5
    assert run.steps["combine"].output.load() == [0, 1, 4, 9, 16]
    assert run.steps["process_chunk"].output.load() == [0, 1, 4, 9, 16]

    stored = await AsyncClient().get_pipeline_run(run.id)
    assert element_names(stored, "process_chunk") == names
    assert all(stored.steps[n].status is StepStatus.COMPLETED for n in names)
    assert stored.steps["combine"].output.load() == [0, 1, 4, 9, 16]


def test_map_from_synchronous_code(stack: Stack) -> None:
    """A plain synchronous call of a mapping pipeline works the same way."""
    run = fan_out(n=3)
    assert run.steps["combine"].output.load() == [0, 1, 4]
    assert element_names(run, "process_chunk") == [f"process_chunk[{k}]" for k in range(3)]


async def test_map_over_an_empty_sequence_gives_an_empty_list(stack: Stack) -> None:
    """Mapping over an empty sequence runs no element and hands the fan-in step []."""
    run = await fan_out.run(n=0)
    assert run.status is RunStatus.COMPLETED
    assert element_names(run, "process_chunk") == []
    assert run.steps["combine"].output.load() == []


async def test_element_step_context_names_the_element(stack: Stack) -> None:
    """Inside an element body, the step context's step run is the element's (its name and
    parameters)."""

    @step(enable_cache=False)
    def who(x: str) -> str:
        sr = get_step_context().step_run
        return f"{sr.name}:{sr.config.parameters['x']}"

    @step
    def letters() -> list[str]:
        return ["a", "b", "c"]

    @pipeline
    def contexts() -> None:
        who.map(letters())

    run = await contexts.run()
    assert run.steps["who"].output.load() == ["who[0]:a", "who[1]:b", "who[2]:c"]


async def test_chained_maps(stack: Stack) -> None:
    """The list handle of one `.map()` can be mapped again by another step."""

    @step(enable_cache=False)
    def plus_one(x: int) -> int:
        return x + 1

    @pipeline
    def chained() -> None:
        combine(plus_one.map(process_chunk.map(make_chunks(4))))

    run = await chained.run()
    assert run.steps["combine"].output.load() == [1, 2, 5, 10]
    assert element_names(run, "plus_one") == [f"plus_one[{k}]" for k in range(4)]


# -- zip, unmapped, product --------------------------------------------------------------------


@step(enable_cache=False)
def pair(a: int, b: str, suffix: str = "") -> str:
    return f"{a}{b}{suffix}"


@step
def ints(n: int) -> list[int]:
    return list(range(n))


@step
def strs(n: int) -> list[str]:
    return [chr(ord("a") + i) for i in range(n)]


async def test_extra_sequence_arguments_are_zipped(stack: Stack) -> None:
    """Further sequence arguments, positional or keyword, handles or literal lists, are zipped
    with the first one."""

    @pipeline
    def zipped() -> None:
        pair.map(ints(3), strs(3), step_name="positional")
        pair.map(ints(3), b=strs(3), step_name="keyword")
        pair.map(ints(3), ["x", "y", "z"], step_name="literal")

    run = await zipped.run()
    assert run.steps["positional"].output.load() == ["0a", "1b", "2c"]
    assert run.steps["keyword"].output.load() == ["0a", "1b", "2c"]
    assert run.steps["literal"].output.load() == ["0x", "1y", "2z"]
    assert run.steps["positional[2]"].config.parameters["b"] == "c"


async def test_zipped_sequences_of_different_lengths_are_a_step_input_error(stack: Stack) -> None:
    """Zipped sequences of different lengths fail the mapped step with a StepInputError naming
    the step, no element runs, and downstream steps are skipped."""

    @step(enable_cache=False)
    def joined(values: list[str]) -> str:
        return "".join(values)

    @pipeline
    def mismatched() -> None:
        joined(pair.map(ints(3), strs(2)))

    with pytest.raises(RunFailedError) as info:
        await mismatched.run()
    cause = info.value.__cause__
    assert isinstance(cause, StepInputError)
    assert "pair" in str(cause)
    run = info.value.run
    assert run is not None
    assert run.steps["pair"].status is StepStatus.FAILED
    assert element_names(run, "pair") == []
    assert run.steps["joined"].status is StepStatus.SKIPPED


async def test_mapping_a_non_sequence_is_a_step_input_error(stack: Stack) -> None:
    """Mapping over a value that is not a sequence (an int) is a StepInputError naming the step
    and the argument."""

    @step
    def number() -> int:
        return 3

    @step(enable_cache=False)
    def double(x: int) -> int:
        return 2 * x

    @pipeline
    def not_a_sequence() -> None:
        double.map(number())

    with pytest.raises(RunFailedError) as info:
        await not_a_sequence.run()
    assert isinstance(info.value.__cause__, StepInputError)
    assert "double" in str(info.value.__cause__) and "x" in str(info.value.__cause__)


async def test_unmapped_arguments_are_passed_whole(stack: Stack) -> None:
    """`unmapped(x)` passes x whole to every element: a literal list and an upstream list."""

    @step(enable_cache=False)
    def tag(x: int, labels: list[str], table: list[int]) -> str:
        return f"{labels[x]}={table[x]}/{len(table)}"

    @step
    def lookup() -> list[int]:
        return [100, 200, 300]

    @pipeline
    def with_unmapped() -> None:
        tag.map(ints(3), labels=unmapped(["p", "q", "r"]), table=unmapped(lookup()))

    run = await with_unmapped.run()
    assert run.steps["tag"].output.load() == ["p=100/3", "q=200/3", "r=300/3"]
    assert run.steps["tag[1]"].config.parameters["labels"] == ["p", "q", "r"]


async def test_product_maps_over_the_cartesian_product(stack: Stack) -> None:
    """`.product(a, b)` runs one element per combination, in itertools.product order, with an
    unmapped constant passed to each."""

    @pipeline
    def grid() -> None:
        combine_strs(pair.product(ints(2), strs(3), suffix=unmapped("!")))

    @step(enable_cache=False)
    def combine_strs(values: list[str]) -> str:
        return ",".join(values)

    run = await grid.run()
    assert run.steps["pair"].output.load() == ["0a!", "0b!", "0c!", "1a!", "1b!", "1c!"]
    assert element_names(run, "pair") == [f"pair[{k}]" for k in range(6)]
    assert run.steps["combine_strs"].output.load() == "0a!,0b!,0c!,1a!,1b!,1c!"


async def test_product_with_an_empty_sequence_is_empty(stack: Stack) -> None:
    """A product with an empty factor has no elements and yields []."""

    @pipeline
    def empty_grid() -> None:
        pair.product(ints(0), strs(3))

    run = await empty_grid.run()
    assert run.steps["pair"].output.load() == []


def test_map_outside_a_pipeline_is_a_definition_error() -> None:
    """`.map()` outside a pipeline function is a PipelineDefinitionError."""
    with pytest.raises(PipelineDefinitionError):
        process_chunk.map([1, 2, 3])


# -- caching, retries, hooks -------------------------------------------------------------------


async def test_elements_are_cached_one_by_one(stack: Stack) -> None:
    """Re-running with one element changed re-runs only that element; the others are CACHED and
    the fan-in sees the new list."""
    calls: list[int] = []

    @step
    def values(data: list[int]) -> list[int]:
        return data

    @step
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    @pipeline
    def cached_map(data: list[int]) -> None:
        combine(square.map(values(data)))

    first = await cached_map.run(data=[1, 2, 3, 4])
    assert sorted(calls) == [1, 2, 3, 4]
    assert all(first.steps[n].status is StepStatus.COMPLETED
               for n in element_names(first, "square"))

    calls.clear()
    second = await cached_map.run(data=[1, 2, 30, 4])
    assert calls == [30]
    statuses = [second.steps[n].status for n in element_names(second, "square")]
    assert statuses == [StepStatus.CACHED, StepStatus.CACHED, StepStatus.COMPLETED,
                        StepStatus.CACHED]
    assert second.steps["combine"].output.load() == [1, 4, 900, 16]
    assert second.steps["square[0]"].output.load() == 1

    stored = await AsyncClient().get_pipeline_run(second.id)
    assert stored.steps["square[1]"].status is StepStatus.CACHED
    assert stored.steps["square[2]"].status is StepStatus.COMPLETED


async def test_zipped_element_cache_covers_every_mapped_argument(stack: Stack) -> None:
    """With two zipped upstream sequences, changing one value of the second sequence re-runs
    only the element that receives it."""
    calls: list[tuple[int, str]] = []

    @step
    def zipped_body(a: int, b: str) -> str:
        calls.append((a, b))
        return f"{a}{b}"

    @step
    def letters_from(data: list[str]) -> list[str]:
        return data

    @pipeline
    def zip_cached(data: list[str]) -> None:
        zipped_body.map(ints(3), letters_from(data))

    await zip_cached.run(data=["a", "b", "c"])
    calls.clear()
    run = await zip_cached.run(data=["a", "B", "c"])
    assert calls == [(1, "B")]
    assert run.steps["zipped_body"].output.load() == ["0a", "1B", "2c"]


async def test_changing_an_unmapped_argument_misses_every_element(stack: Stack) -> None:
    """An unmapped argument is part of every element's cache key: changing it re-runs them all."""
    calls: list[int] = []

    @step
    def scaled(x: int, factor: int) -> int:
        calls.append(x)
        return x * factor

    @pipeline
    def unmapped_cached(factor: int) -> None:
        scaled.map(ints(3), factor=unmapped(factor))

    await unmapped_cached.run(factor=2)
    calls.clear()
    same = await unmapped_cached.run(factor=2)
    assert calls == []
    assert same.steps["scaled"].output.load() == [0, 2, 4]
    changed = await unmapped_cached.run(factor=3)
    assert sorted(calls) == [0, 1, 2]
    assert changed.steps["scaled"].output.load() == [0, 3, 6]


async def test_literal_mapped_list_is_cached_per_element(stack: Stack) -> None:
    """Mapping over a literal list (a pipeline parameter) caches each element on its own too."""
    calls: list[int] = []

    @step
    def cube(x: int) -> int:
        calls.append(x)
        return x ** 3

    @pipeline
    def literal_cached(data: list[int]) -> None:
        cube.map(data)

    await literal_cached.run(data=[1, 2, 3])
    calls.clear()
    run = await literal_cached.run(data=[1, 2, 30])
    assert run.steps["cube"].output.load() == [1, 8, 27000]
    assert calls == [30]


async def test_elements_are_retried_one_by_one(stack: Stack) -> None:
    """A failing element is retried on its own: only it makes a second attempt."""
    attempts: dict[int, int] = {}

    @step(enable_cache=False, retry=StepRetryConfig(max_retries=2))
    def flaky(x: int) -> int:
        attempts[x] = attempts.get(x, 0) + 1
        assert get_step_context().step_run.attempt == attempts[x]
        if x == 2 and attempts[x] < 2:
            raise ConnectionError("transient")
        return x

    @pipeline
    def retried_map() -> None:
        combine(flaky.map(ints(4)))

    run = await retried_map.run()
    assert run.steps["combine"].output.load() == [0, 1, 2, 3]
    assert attempts == {0: 1, 1: 1, 2: 2, 3: 1}
    assert [run.steps[n].attempts for n in element_names(run, "flaky")] == [1, 1, 2, 1]


async def test_elements_are_hooked_one_by_one(stack: Stack) -> None:
    """Success and failure hooks run once per element with the element's invocation ID."""
    seen: list[tuple[str, str]] = []

    def on_success(step_name: str, step_output: Any) -> None:
        seen.append(("ok", f"{step_name}={step_output}"))

    def on_failure(step_name: str, exception: BaseException) -> None:
        seen.append(("failed", f"{step_name}:{exception}"))

    @step(enable_cache=False, on_success=on_success, on_failure=on_failure)
    def maybe(x: int) -> int:
        if x == 1:
            raise ValueError("one is bad")
        return x * 10

    @pipeline
    def hooked_map() -> None:
        maybe.map(ints(3))

    with pytest.raises(RunFailedError):
        await hooked_map.run()
    assert sorted(seen) == [("failed", "maybe[1]:one is bad"), ("ok", "maybe[0]=0"),
                            ("ok", "maybe[2]=20")]


# -- failures and execution modes --------------------------------------------------------------


def failing_map_pipeline(mode: ExecutionMode, sleep: float) -> tuple[Any, dict[str, Any]]:
    """A pipeline mapping over 4 elements where element 1 fails at once and the others sleep
    `sleep` seconds; a fan-in after the map and an independent step beside it."""
    state: dict[str, Any] = {"finished": []}

    @step(enable_cache=False)
    async def work(x: int) -> int:
        if x == 1:
            await asyncio.sleep(0.05)
            raise RuntimeError("element 1 broke")
        await asyncio.sleep(sleep)
        state["finished"].append(x)
        return x

    @step(enable_cache=False)
    def fan_in(values: list[int]) -> int:
        return sum(values)

    @step(enable_cache=False)
    async def independent() -> int:
        await asyncio.sleep(sleep + 0.2)
        return 1

    @pipeline(execution_mode=mode)
    def failing_map() -> None:
        fan_in(work.map(ints(4)))
        independent()

    return failing_map, state


async def test_failing_element_continue_on_failure(stack: Stack) -> None:
    """CONTINUE_ON_FAILURE: the other elements complete, the mapped step and the run fail, the
    fan-in after the map is SKIPPED and an independent step completes."""
    p, state = failing_map_pipeline(ExecutionMode.CONTINUE_ON_FAILURE, sleep=0.3)
    with pytest.raises(RunFailedError) as info:
        await p.run()
    run = info.value.run
    assert run is not None and run.status is RunStatus.FAILED
    assert "element 1 broke" in str(info.value.__cause__)
    statuses = {n: run.steps[n].status for n in element_names(run, "work")}
    assert statuses == {"work[0]": StepStatus.COMPLETED, "work[1]": StepStatus.FAILED,
                        "work[2]": StepStatus.COMPLETED, "work[3]": StepStatus.COMPLETED}
    assert sorted(state["finished"]) == [0, 2, 3]
    assert run.steps["work"].status is StepStatus.FAILED
    assert run.steps["fan_in"].status is StepStatus.SKIPPED
    assert run.steps["independent"].status is StepStatus.COMPLETED

    stored = await AsyncClient().get_pipeline_run(run.id)
    assert stored.steps["work[1]"].status is StepStatus.FAILED
    assert stored.steps["work[2]"].status is StepStatus.COMPLETED
    assert stored.steps["fan_in"].status is StepStatus.SKIPPED


async def test_failing_element_stop_on_failure(stack: Stack) -> None:
    """STOP_ON_FAILURE: the running elements are drained (COMPLETED), the fan-in is SKIPPED."""
    p, state = failing_map_pipeline(ExecutionMode.STOP_ON_FAILURE, sleep=0.3)
    with pytest.raises(RunFailedError) as info:
        await p.run()
    run = info.value.run
    assert run is not None
    assert sorted(state["finished"]) == [0, 2, 3]
    assert [run.steps[n].status for n in element_names(run, "work")] == [
        StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.COMPLETED, StepStatus.COMPLETED]
    assert run.steps["fan_in"].status is StepStatus.SKIPPED


async def test_failing_element_fail_fast_stops_the_other_elements(stack: Stack) -> None:
    """FAIL_FAST: the elements still running are STOPPED at once (none finishes its 30 s sleep),
    the fan-in and the independent step do not complete, and the run ends quickly."""
    p, state = failing_map_pipeline(ExecutionMode.FAIL_FAST, sleep=30)
    started = time.monotonic()
    with pytest.raises(RunFailedError) as info:
        await p.run()
    assert time.monotonic() - started < 10
    run = info.value.run
    assert run is not None and run.status is RunStatus.FAILED
    assert [run.steps[n].status for n in element_names(run, "work")] == [
        StepStatus.STOPPED, StepStatus.FAILED, StepStatus.STOPPED, StepStatus.STOPPED]
    assert state["finished"] == []
    assert run.steps["fan_in"].status is StepStatus.SKIPPED
    assert run.steps["independent"].status is StepStatus.STOPPED

    stored = await AsyncClient().get_pipeline_run(run.id)
    assert stored.steps["work[0]"].status is StepStatus.STOPPED
    assert stored.steps["work[1]"].status is StepStatus.FAILED


# -- concurrency -------------------------------------------------------------------------------


async def test_elements_are_bounded_by_max_concurrency(stack: Stack) -> None:
    """With max_concurrency=2, at most two element bodies run at once (and two do)."""
    state = {"now": 0, "peak": 0}

    @step(enable_cache=False)
    async def counted(x: int) -> int:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        return x

    @pipeline(max_concurrency=2)
    def bounded() -> None:
        counted.map(ints(8))

    run = await bounded.run()
    assert run.steps["counted"].output.load() == list(range(8))
    assert state["peak"] == 2


async def test_elements_run_concurrently_without_a_bound(stack: Stack) -> None:
    """Without max_concurrency, the elements of a map run at the same time."""
    state = {"now": 0, "peak": 0}

    @step(enable_cache=False)
    async def counted(x: int) -> int:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.1)
        state["now"] -= 1
        return x

    @pipeline
    def unbounded() -> None:
        counted.map(ints(6))

    run = await unbounded.run()
    assert run.steps["counted"].output.load() == list(range(6))
    assert state["peak"] == 6
