"""A service's load on flowcore, in process: throughput and event-loop lag (issue 11 item 3).

    python benchmarks/bench_service.py [--stack memory|default|both] [--waited 200]
                                       [--concurrency 16] [--background 500] [--sleep 0.02]
                                       [--repeat 3] [--gc-log]

The work is the example service's pipeline (examples/service.py): `numbers(3)` ->
`square.map` -> `total` (a sync step, run in a worker thread) -> `publish` (an async sleep,
`--sleep`). Two loads, as a request handler would make them:

- **waited**: 200 runs awaited (`await p.run()`), 16 at a time (a handler per request);
- **background**: 500 `p.submit()` calls in a burst, then every handle awaited.

The floor is the same work in plain asyncio (the same functions: tasks per element, the sync
step through `asyncio.to_thread`), measured in the same process, alternating with flowcore.
A 10 ms ticker task measures the loop's lag (how late each tick fires) during each load:
p50 / p99 / max. With `--gc-log`, garbage-collector pauses during the loads are reported too.
Figures are medians over `--repeat` repetitions (each on the same stack, after a warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from flowcore import Stack, pipeline, step

perf = time.perf_counter
logging.getLogger("flowcore").addHandler(logging.NullHandler())


@step
async def numbers(n: int) -> list[int]:
    return list(range(n))


@step
async def square(x: int) -> int:
    return x * x


@step
def total(values: list[int]) -> int:
    return sum(values)


@step
async def publish(value: int, sleep: float) -> str:
    await asyncio.sleep(sleep)
    return f"total={value}"


@pipeline(enable_cache=False)
def demo(n: int = 3, sleep: float = 0.2) -> None:
    publish(total(square.map(numbers(n))), sleep=sleep)


async def plain_demo(n: int, sleep: float) -> str:
    """The same work without flowcore."""
    xs = await asyncio.create_task(_numbers(n))
    squares = await asyncio.gather(*[asyncio.create_task(_square(x)) for x in xs])
    value = await asyncio.to_thread(sum, squares)
    return await asyncio.create_task(_publish(value, sleep))


async def _numbers(n: int) -> list[int]:
    return list(range(n))


async def _square(x: int) -> int:
    return x * x


async def _publish(value: int, sleep: float) -> str:
    await asyncio.sleep(sleep)
    return f"total={value}"


# -- measuring ------------------------------------------------------------------------------------


class Ticker:
    """How late a 10 ms ticker fires, while a load runs."""

    def __init__(self) -> None:
        self.lags: list[float] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async def tick() -> None:
            while True:
                due = perf() + 0.01
                await asyncio.sleep(0.01)
                self.lags.append(max(0.0, perf() - due))

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(tick())
            try:
                yield
            finally:
                task.cancel()


class GcLog:
    """Durations of the garbage collector's passes (gc.callbacks), by generation."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = perf()
        else:
            self.pauses.append((int(info["generation"]), perf() - self._start))


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def waited_load(run_one: Callable[[], Awaitable[Any]], runs: int, concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            await run_one()

    async with asyncio.TaskGroup() as tg:
        for _ in range(runs):
            tg.create_task(one())


async def measure(load: Callable[[], Awaitable[None]], gc_log: GcLog | None
                  ) -> tuple[float, list[float], list[tuple[int, float]]]:
    gc.collect()
    ticker = Ticker()
    if gc_log is not None:
        gc_log.pauses.clear()
        gc.callbacks.append(gc_log)
    try:
        async with ticker.running():
            t0 = perf()
            await load()
            wall = perf() - t0
    finally:
        if gc_log is not None:
            gc.callbacks.remove(gc_log)
    return wall, ticker.lags, list(gc_log.pauses) if gc_log is not None else []


async def bench_stack(kind: str, args: argparse.Namespace) -> list[str]:
    home = tempfile.mkdtemp(prefix="flowcore-service-bench-")
    stack = Stack.in_memory() if kind == "memory" else Stack.local(home)
    p = demo.with_options(stack=stack)
    params = {"n": 3, "sleep": args.sleep}
    gc_log = GcLog() if args.gc_log else None
    lines = []
    try:
        async with stack:
            await p.run(**params)  # warm-up

            async def fc_waited() -> None:
                await waited_load(lambda: p.run(**params), args.waited, args.concurrency)

            async def plain_waited() -> None:
                await waited_load(lambda: plain_demo(**params), args.waited, args.concurrency)

            async def fc_background() -> None:
                handles = [p.submit(**params) for _ in range(args.background)]
                for h in handles:
                    await h

            async def plain_background() -> None:
                tasks = [asyncio.create_task(plain_demo(**params)) for _ in range(args.background)]
                for t in tasks:
                    await t

            for label, fc, plain, runs in (
                (f"{args.waited} waited runs, {args.concurrency} at a time", fc_waited,
                 plain_waited, args.waited),
                (f"{args.background} background submissions", fc_background, plain_background,
                 args.background),
            ):
                fc_walls: list[float] = []
                plain_walls: list[float] = []
                lag_p50: list[float] = []
                lag_p99: list[float] = []
                lag_max: list[float] = []
                plain_p99: list[float] = []
                gc_max: list[float] = []
                for _ in range(args.repeat):
                    wall, _lags, _ = await measure(plain, None)
                    plain_walls.append(wall)
                    plain_p99.append(pct(_lags, 0.99))
                    wall, lags, pauses = await measure(fc, gc_log)
                    fc_walls.append(wall)
                    lag_p50.append(pct(lags, 0.5))
                    lag_p99.append(pct(lags, 0.99))
                    lag_max.append(max(lags, default=0.0))
                    gc_max.append(max((d for _, d in pauses), default=0.0))
                fcm, plm = statistics.median(fc_walls), statistics.median(plain_walls)
                gc_note = (f" | {statistics.median(gc_max) * 1e3:.1f} ms"
                           if gc_log is not None else "")
                lines.append(
                    f"| {kind} | {label} | {runs / plm:,.0f} runs/s | {runs / fcm:,.0f} runs/s "
                    f"| {plm / fcm:.2f}x | {statistics.median(lag_p50) * 1e3:.1f} / "
                    f"{statistics.median(lag_p99) * 1e3:.1f} / {statistics.median(lag_max) * 1e3:.1f} ms "
                    f"| {statistics.median(plain_p99) * 1e3:.1f} ms{gc_note} |")
                print(lines[-1], file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return lines


async def main(args: argparse.Namespace) -> int:
    kinds = ["memory", "default"] if args.stack == "both" else [args.stack]
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = []
    for kind in kinds:
        lines += await bench_stack(kind, args)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before: {load_before}; after: {load}; medians of {args.repeat}; "
          f"publish sleeps {args.sleep * 1e3:g} ms\n")
    gc_head = " | longest GC pause" if args.gc_log else ""
    print(f"| stack | load | plain asyncio | flowcore | flowcore / plain | loop lag p50 / p99 / "
          f"max | plain lag p99{gc_head} |")
    print("|---|---|---|---|---|---|---|" + ("---|" if args.gc_log else ""))
    for line in lines:
        print(line)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--stack", choices=("memory", "default", "both"), default="both")
    ap.add_argument("--waited", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--background", type=int, default=500)
    ap.add_argument("--sleep", type=float, default=0.02, help="publish's sleep (seconds)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gc-log", action="store_true", help="report garbage-collector pauses")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
