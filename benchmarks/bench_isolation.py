"""What value isolation costs (API.md §6: "each consumer gets a value equal to the stored
artifact"), and why copy-on-read was chosen.

Prints a markdown table. For a few value shapes it measures, per consumer:

- **copy-on-read** (what flowcore does): its own deep copy of the upstream value (lists and
  dicts by comprehension, else `copy.deepcopy`), or nothing for an immutable value;
- **hash check after the body**: a sha256 of the value's JSON form, which a consumer would pay
  after its body even when it changed nothing (and it finds a mutation only after the fact);
- **per-consumer load**: a pickle round trip, standing in for loading the stored artifact again.

And end to end: a fan-out of 200 consumers of one upstream value on `Stack.in_memory()`, per
consumer step, against the same fan-out of an `int` (nothing to copy).

    python benchmarks/bench_isolation.py
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pickle
import statistics
import time
from collections.abc import Callable
from typing import Any

from flowcore import Stack, pipeline, step

SHAPES: dict[str, Any] = {
    "int": 7,
    "tuple of 100 ints": tuple(range(100)),
    "list of 100 ints": list(range(100)),
    "dict of 100 str -> list[int] (5)": {f"k{i}": [i] * 5 for i in range(100)},
    "list of 10,000 ints (~80 KB)": list(range(10_000)),
}


def per_call(fn: Callable[[], Any], repeat: int = 5, number: int = 200) -> float:
    """Median seconds per call over `repeat` batches of `number` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def micro() -> list[str]:
    from flowcore.materializers._copying import deep_copy
    from flowcore.materializers._estimate import is_immutable

    rows = []
    for name, value in SHAPES.items():
        shared = is_immutable(value)
        copy_cost = 0.0 if shared else per_call(lambda v=value: deep_copy(v, {}))
        hash_cost = per_call(lambda v=value: hashlib.sha256(
            json.dumps(v, sort_keys=True).encode()).hexdigest())
        load_cost = per_call(lambda v=value: pickle.loads(pickle.dumps(v)))
        rows.append(f"| {name} | {'shared (0)' if shared else f'{copy_cost * 1e6:.1f} µs'} "
                    f"| {hash_cost * 1e6:.1f} µs | {load_cost * 1e6:.1f} µs |")
    return rows


def fan_out(value: Any, consumers: int = 200) -> float:
    @step(enable_cache=False)
    def make() -> Any:
        return value

    @step(enable_cache=False)
    def use(x: Any) -> int:
        return 1

    @pipeline
    def fan() -> None:
        v = make()
        for _ in range(consumers):
            use(v)

    async def once() -> float:
        p = fan.with_options(stack=Stack.in_memory())
        await p.run()  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            await p.run()
            times.append(time.perf_counter() - start)
        return statistics.median(times) / consumers

    return asyncio.run(once())


def main() -> None:
    print("### Isolation: cost per consumer of one upstream value\n")
    print("| value | copy-on-read (flowcore) | hash check after body | per-consumer load |")
    print("|---|---|---|---|")
    for row in micro():
        print(row)
    print("\n### End to end: 200 consumers of one value, `Stack.in_memory()`, per consumer step\n")
    print("| upstream value | per consumer step | over the `int` fan-out |")
    print("|---|---|---|")
    base = fan_out(7)
    print(f"| int (shared, nothing copied) | {base * 1e6:.1f} µs | — |")
    for name in ("list of 100 ints", "dict of 100 str -> list[int] (5)",
                 "list of 10,000 ints (~80 KB)"):
        cost = fan_out(SHAPES[name])
        print(f"| {name} | {cost * 1e6:.1f} µs | +{(cost - base) * 1e6:.1f} µs |")


if __name__ == "__main__":
    main()
