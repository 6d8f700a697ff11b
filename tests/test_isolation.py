"""Values are isolated (API.md §6): a step that changes an input in place changes nothing
that another step, a later run, the cache or the stored artifact sees, on every stack."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from flowcore import Stack, pipeline, step
from flowcore._engine._isolation import isolated
from flowcore.materializers._estimate import is_immutable, roughly_small


@pytest.fixture(params=["memory", "local"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Stack:
    """Both stacks a user has."""
    return Stack.in_memory() if request.param == "memory" else Stack.local(tmp_path)


@step
def numbers() -> list[int]:
    return [1, 2, 3]


# Inputs left unannotated on purpose: pydantic's validation of a `list[int]` input would hand
# the body a new list anyway, hiding what isolation must guarantee for any value.
@step
def append_100(xs):  # type: ignore[no-untyped-def]
    xs.append(100)
    return len(xs)


@step
def total(xs):  # type: ignore[no-untyped-def]
    return sum(xs)


@pipeline
def siblings() -> None:
    append_100(numbers())


async def test_a_mutating_sibling_changes_nothing_another_consumer_sees(stack: Stack) -> None:
    """`total` gets 6 whatever `append_100` does to its own copy, and the artifact stays."""

    @pipeline
    def both() -> None:
        xs = numbers()
        append_100(xs, after=None)
        total(xs, after="append_100")

    run = await both.with_options(stack=stack, enable_cache=False).run()
    assert run.steps["total"].output.load() == 6
    assert run.steps["numbers"].output.load() == [1, 2, 3]


async def test_a_mutated_input_never_reaches_the_cache(stack: Stack) -> None:
    """After a run in which a consumer mutated its input, a cached run elsewhere gets the
    value the producer returned, not the mutated one."""

    @pipeline
    def mutate_then_sum() -> None:
        xs = numbers()
        append_100(xs)
        total(xs, after="append_100")

    await mutate_then_sum.with_options(stack=stack).run()

    @pipeline
    def just_sum() -> None:
        total(numbers())

    run = await just_sum.with_options(stack=stack).run()
    assert run.steps["numbers"].status.value == "cached"
    assert run.steps["total"].output.load() == 6


@step
def rows() -> list[dict[str, int]]:
    return [{"v": 1}, {"v": 2}]


@step
def bump(row, shared):  # type: ignore[no-untyped-def]
    row["v"] += 10
    shared.append(1)
    return row["v"] + len(shared)


@step
def collect(values, original):  # type: ignore[no-untyped-def]
    return [*values, *(r["v"] for r in original)]


async def test_mapped_elements_get_their_own_copies(stack: Stack) -> None:
    """Mapped elements mutating their element and an argument passed whole affect neither
    each other nor the upstream value a later step reads."""
    from flowcore import unmapped

    @pipeline
    def mapped() -> None:
        r = rows()
        s = numbers()
        collect(bump.map(r, unmapped(s)), r)

    run = await mapped.with_options(stack=stack, enable_cache=False).run()
    assert run.steps["collect"].output.load() == [11 + 4, 12 + 4, 1, 2]


async def test_a_hook_changing_step_output_changes_no_consumer() -> None:
    """An on_success hook that mutates `step_output` leaves the consumers' inputs alone."""

    def spoil(step_output: Any) -> None:
        step_output.append(999)

    spoiled = numbers.with_options(on_success=spoil)

    @pipeline
    def hooked() -> None:
        total(spoiled())

    run = await hooked.with_options(stack=Stack.in_memory(), enable_cache=False).run()
    assert run.steps["total"].output.load() == 6


def test_immutable_values_are_shared_and_mutable_ones_copied() -> None:
    """Ints, strs and tuples of them are passed as they are; lists and dicts are copied."""
    value = (1, "a", (2.0, None))
    assert asyncio.run(isolated(value)) is value
    assert is_immutable(frozenset({1, 2}))
    assert not is_immutable((1, [2]))
    mutable = {"a": [1, 2]}
    copy = asyncio.run(isolated(mutable))
    assert copy == mutable and copy is not mutable and copy["a"] is not mutable["a"]


def test_size_estimate_is_bounded_and_conservative() -> None:
    """Small containers are small; a 2-million-int list or a 1 MB string is not."""
    assert roughly_small([1, 2, 3]) and roughly_small({"a": "b" * 100})
    assert not roughly_small(list(range(2_000_000)))
    assert not roughly_small("x" * 1_000_000)
    assert not roughly_small({i: i for i in range(300_000)})
