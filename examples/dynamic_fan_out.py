"""Dynamic fan-out with `.map()`, `unmapped()` and a fan-in step.

The number of parallel branches is known only at run time: `list_shards` decides how many
shards there are (imagine a database query), `score_shard.map(shards, ...)` becomes one
invocation per shard (`score_shard[0]`, `score_shard[1]`, ...), and `summarize` receives the
list of their results in shard order.

- `unmapped(x)` passes `x` whole to every element (here a threshold and a lookup table produced
  by another step) instead of mapping over it.
- Each element is its own step run: cached, retried and hooked on its own. Re-running with one
  shard changed re-runs only that shard.
- `.product(a, b)` maps over the cartesian product of two sequences.

Run it with:  python examples/dynamic_fan_out.py
"""

from __future__ import annotations

import asyncio
import logging

import flowcore
from flowcore import Stack, StepRetryConfig, get_step_context, pipeline, step, unmapped


@step
def list_shards(rows: list[int], shard_size: int) -> list[list[int]]:
    # How many shards there are depends on the data: known only when this step has run.
    return [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]


@step
def load_weights() -> dict[int, float]:
    return {value: 1.0 + value / 100 for value in range(100)}


@step(retry=StepRetryConfig(max_retries=2))
async def score_shard(shard: list[int], threshold: int, weights: dict[int, float]) -> float:
    ctx = get_step_context()
    await asyncio.sleep(0.05)  # the shards run concurrently on the event loop
    score = sum(weights[v] for v in shard if v >= threshold)
    print(f"  {ctx.step_run.name}: {len(shard)} rows -> {score:.2f}")
    return round(score, 2)


@step
def summarize(scores: list[float]) -> dict[str, float]:
    return {"shards": len(scores), "total": round(sum(scores), 2), "best": max(scores, default=0)}


@pipeline
def scoring(rows: list[int], shard_size: int = 4, threshold: int = 3) -> None:
    shards = list_shards(rows, shard_size)
    scores = score_shard.map(shards, threshold=unmapped(threshold), weights=unmapped(load_weights()))
    summarize(scores)


@step
def learning_rates() -> list[float]:
    return [0.01, 0.1]


@step
def depths() -> list[int]:
    return [2, 4]


@step
def evaluate(lr: float, depth: int) -> str:
    return f"lr={lr},depth={depth}:{lr * depth:.2f}"


@pipeline
def grid_search() -> None:
    evaluate.product(learning_rates(), depths())


def main() -> None:
    flowcore.enable_console_logging(logging.WARNING)
    flowcore.set_active_stack(Stack.in_memory())

    print("1) 10 rows in shards of 4: three shard invocations, known only at run time")
    run = scoring(rows=list(range(10)))
    elements = [name for name in run.steps if name.startswith("score_shard[")]
    print(f"  element step runs: {elements}")
    print(f"  fan-in got: {run.steps['summarize'].output.load()}")

    print("\n2) the same rows plus two more: the first two shards are cached, the rest run")
    run = scoring(rows=[*range(10), 10, 11])
    for name in (n for n in run.steps if n.startswith("score_shard[")):
        print(f"  {name}: {run.steps[name].status.value.upper()}")
    print(f"  fan-in got: {run.steps['summarize'].output.load()}")

    print("\n3) .product(): one invocation per (lr, depth) combination")
    run = grid_search()
    print(f"  {run.steps['evaluate'].output.load()}")


if __name__ == "__main__":
    main()
