"""Fan-out and fan-in, static and dynamic.

1. Static fan-out: a Python loop in the pipeline function calls `process_chunk` five times
   (invocation IDs `process_chunk`, `process_chunk_2`, ... `process_chunk_5`); the fan-in step
   takes the list of their output handles and receives the list of values. Unlike ZenML, no
   Client query is needed inside the fan-in step.
2. Dynamic fan-out: `process_chunk.map(chunks)` maps over a value known only at run time (the
   output of `split`). Each element runs as its own invocation (`process_chunk[0]`, ...),
   cached, retried and hooked on its own; the handle `.map()` returns is the list of results,
   in order. `unmapped(x)` passes `x` whole to every element, and `.product(a, b)` maps over
   the cartesian product.

Run it with:  python examples/fan_out_fan_in.py
"""

from __future__ import annotations

import asyncio
import logging
import time

import flowcore
from flowcore import Stack, enable_console_logging, pipeline, step, unmapped


@step
async def process_chunk(chunk_id: int, scale: int = 1) -> int:
    await asyncio.sleep(0.1)  # the invocations run concurrently
    return chunk_id * chunk_id * scale


@step
def combine_results(results: list[int]) -> int:
    print(f"  combine_results got {results}")
    return sum(results)


@pipeline
def static_fan_pipeline() -> None:
    # Fan-out: the number of branches is fixed when the pipeline function runs.
    results = []
    for i in range(5):
        results.append(process_chunk(i))
    # Fan-in: a list of handles becomes a list of values.
    combine_results(results)


@step
def split(n_chunks: int) -> list[int]:
    # Imagine a database query: how many chunks there are is known only at run time.
    return list(range(n_chunks))


@pipeline
def dynamic_fan_pipeline(n_chunks: int = 6, scale: int = 10) -> None:
    chunks = split(n_chunks)
    results = process_chunk.map(chunks, scale=unmapped(scale))
    combine_results(results)


@step
def score(lr: float, depth: int) -> float:
    return round(lr * depth, 3)


@step
def best(scores: list[float]) -> float:
    print(f"  grid scores: {scores}")
    return max(scores)


@step
def learning_rates() -> list[float]:
    return [0.01, 0.1]


@step
def depths() -> list[int]:
    return [2, 4, 8]


@pipeline
def grid_pipeline() -> None:
    best(score.product(learning_rates(), depths()))


def main() -> None:
    enable_console_logging(logging.WARNING)
    flowcore.set_active_stack(Stack.in_memory())

    print("1) static fan-out with a loop, fan-in with a list of handles")
    started = time.perf_counter()
    run = static_fan_pipeline()
    took = time.perf_counter() - started
    print(f"  steps: {list(run.steps)}")
    print(f"  total = {run.steps['combine_results'].output.load()} "
          f"(5 x 0.1 s chunks ran concurrently: {took:.2f} s)")

    print("\n2) dynamic fan-out with .map() over a run-time list")
    run = dynamic_fan_pipeline(n_chunks=6, scale=10)
    print(f"  steps: {list(run.steps)}")
    print(f"  total = {run.steps['combine_results'].output.load()}")

    print("   ... and again: every element is cached on its own")
    run = dynamic_fan_pipeline(n_chunks=7, scale=10)
    statuses = {n: s.status.value for n, s in run.steps.items() if n.startswith("process_chunk[")}
    print(f"  {statuses}")

    print("\n3) .product(): one invocation per combination")
    run = grid_pipeline()
    print(f"  best score = {run.steps['best'].output.load()}")


if __name__ == "__main__":
    main()
