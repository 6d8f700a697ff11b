"""The coalescer that answers concurrent calls in batches (SQLite lookups, Dask results)."""

from __future__ import annotations

import asyncio

import pytest

from flowcore._batching import Coalescer


async def test_concurrent_calls_share_batches_and_get_their_own_answers() -> None:
    """Calls made together run in few batches, and each caller gets the answer for its item,
    or the exception raised for its item alone."""
    batches: list[list[int]] = []

    async def square(items: list[int]) -> list[object]:
        batches.append(items)
        await asyncio.sleep(0.01)
        return [ValueError(f"odd {i}") if i % 5 == 1 else i * i for i in items]

    coalescer: Coalescer[int, int] = Coalescer(square)
    outcomes = await asyncio.gather(*(coalescer(i) for i in range(50)), return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if i % 5 == 1:
            assert isinstance(outcome, ValueError) and str(outcome) == f"odd {i}"
        else:
            assert outcome == i * i
    assert len(batches) <= 3
    assert sorted(i for batch in batches for i in batch) == list(range(50))


async def test_a_cancelled_batch_runner_hands_its_items_to_the_next_caller() -> None:
    """When the caller running a batch is cancelled, the other callers' items are run by one of
    them and everyone else still gets an answer."""
    gate = asyncio.Event()
    calls = 0

    async def slow_echo(items: list[str]) -> list[object]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()  # the first runner is cancelled while waiting here
        return [item.upper() for item in items]

    coalescer: Coalescer[str, str] = Coalescer(slow_echo)
    first = asyncio.create_task(coalescer("a"))
    await asyncio.sleep(0)
    others = [asyncio.create_task(coalescer(x)) for x in "bcd"]
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(asyncio.gather(*others), 5) == ["B", "C", "D"]


async def test_a_failing_batch_fails_every_caller_in_it() -> None:
    """An exception from the batch function itself reaches every caller of that batch."""

    async def broken(items: list[int]) -> list[object]:
        raise RuntimeError("store gone")

    coalescer: Coalescer[int, int] = Coalescer(broken)
    outcomes = await asyncio.gather(coalescer(1), coalescer(2), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
