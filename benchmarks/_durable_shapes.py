"""Issue 11's shapes ("durable at in-memory speed"), used by `bench_scheduler.py --suite issue11`.

Every step returns a value of its own (no two steps store equal content), so the default
stack really stores one artifact per step. Each cell uses one stack: a warm-up run first
(imports, the database opened, the first artifact directory made), then alternating
repetitions of the bare-asyncio floor and of flowcore, each after a `gc.collect()`; medians.
A flowcore figure is `await p.run()` end to end, compile included.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from flowcore import ExecutionMode, RunFailedError, Stack, pipeline, step

perf = time.perf_counter
FAILED_AT: list[float] = []


class Boom(Exception):
    pass


@step(enable_cache=False)
async def d_source(seed: int) -> int:
    return seed


@step(enable_cache=False)
async def d_work(x: int, k: int) -> int:
    return x + k


@step(enable_cache=False)
async def d_sink(xs: list[int]) -> int:
    return sum(xs)


@step(enable_cache=False)
async def d_nap(k: int) -> int:
    await asyncio.sleep(0.05)
    return k


@step(enable_cache=False)
async def d_long(k: int) -> int:
    await asyncio.sleep(10)
    return k


@step(enable_cache=False)
async def d_fail() -> int:
    await asyncio.sleep(0.1)
    FAILED_AT.append(perf())
    raise Boom("planned failure")


@step
async def d_csource() -> int:
    return 0


@step
async def d_cwork(x: int, k: int) -> int:
    return x + k


@pipeline(enable_cache=False)
def d_fan(n: int, seed: int = 0) -> None:
    """d_source -> n x d_work(k=i) -> d_sink(list): n + 2 steps, distinct values."""
    s = d_source(seed)
    d_sink([d_work(s, k=i) for i in range(n)])


@pipeline(enable_cache=False)
def d_chain(n: int, seed: int = 0) -> None:
    """d_source -> d_work(k=1) -> d_work(k=2) -> ...: n steps."""
    x = d_source(seed)
    for i in range(1, n):
        x = d_work(x, k=i)


@pipeline(enable_cache=False)
def d_sleepers(n: int, seed: int = 0) -> None:
    """n independent steps sleeping 50 ms, each returning its own int."""
    for i in range(n):
        d_nap(k=seed + i)


@pipeline(enable_cache=False, execution_mode=ExecutionMode.FAIL_FAST)
def d_fail_fast(n: int, seed: int = 0) -> None:
    """n - 1 steps sleeping 10 s and one failing after 0.1 s."""
    for i in range(n - 1):
        d_long(k=i)
    d_fail()


@pipeline(enable_cache=True)
def d_cached(n: int, seed: int = 0) -> None:
    """d_csource -> n x d_cwork(k=i): run once, then the timed re-run is fully cached."""
    s = d_csource()
    for i in range(n):
        d_cwork(s, k=i)


# -- the bare-asyncio floor of each shape ------------------------------------------------------


async def _src() -> int:
    return 0


async def _work(x: int, k: int) -> int:
    return x + k


async def _sink(xs: list[int]) -> int:
    return sum(xs)


async def floor_fan(n: int) -> float:
    t0 = perf()
    s = await asyncio.create_task(_src())
    xs = await asyncio.gather(*[asyncio.create_task(_work(s, i)) for i in range(n)])
    await asyncio.create_task(_sink(list(xs)))
    return perf() - t0


async def floor_chain(n: int) -> float:
    t0 = perf()
    x = await asyncio.create_task(_src())
    for i in range(1, n):
        x = await asyncio.create_task(_work(x, i))
    return perf() - t0


async def _nap(k: int) -> int:
    await asyncio.sleep(0.05)
    return k


async def floor_sleepers(n: int) -> float:
    t0 = perf()
    await asyncio.gather(*[asyncio.create_task(_nap(i)) for i in range(n)])
    return perf() - t0


async def floor_fail_fast(n: int) -> float:
    """The floor of FAIL_FAST's wall: the failing step's 0.1 s sleep in a TaskGroup."""
    async def fail() -> None:
        await asyncio.sleep(0.1)
        raise Boom("planned failure")

    t0 = perf()
    with contextlib.suppress(BaseExceptionGroup):
        async with asyncio.TaskGroup() as tg:
            for _ in range(n - 1):
                tg.create_task(asyncio.sleep(10))
            tg.create_task(fail())
    return perf() - t0


async def floor_cached(n: int) -> float:
    """Each task hashes its call and finds its result in a dict (a warm cache)."""
    def key(k: int) -> str:
        return hashlib.sha256(json.dumps({"step": "work", "x": 0, "k": k}).encode()).hexdigest()

    cache = {key(k): k for k in range(n + 1)}

    async def lookup(k: int) -> int:
        return cache[key(k)]

    t0 = perf()
    await asyncio.gather(*[asyncio.create_task(lookup(k)) for k in range(n + 1)])
    return perf() - t0


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class Cell:
    label: str
    unit: str  # "step" (per-step figures) or "wall"
    steps: int
    floor: float  # median seconds
    total: float  # median seconds, end to end
    compile: float  # median seconds of the compile inside the run
    target: str
    ok: bool | None
    reps: int
    extra: str = ""


def _new_stack(kind: str, dirs: list[str]) -> Stack:
    if kind == "memory":
        return Stack.in_memory()
    d = tempfile.mkdtemp(prefix="flowcore-bench11-")
    dirs.append(d)
    return Stack.local(d)


async def _timed(p: Any, stack: Stack, params: dict[str, Any]) -> tuple[float, float, Any]:
    configured = p.with_options(stack=stack)
    compile_times: list[float] = []
    inner = configured._compile

    def timed_compile(*a: Any, **kw: Any) -> Any:
        t = perf()
        try:
            return inner(*a, **kw)
        finally:
            compile_times.append(perf() - t)

    configured._compile = timed_compile  # instance attribute shadows the method
    t0 = perf()
    try:
        result: Any = await configured.run(**params)
    except RunFailedError as exc:
        result = exc
    return perf() - t0, (compile_times[0] if compile_times else 0.0), result


async def measure(
    kind: str, p: Any, n: int, floor: Callable[[int], Awaitable[float]], reps: int,
    *, expect_failure: bool = False, new_values: bool = True,
) -> tuple[list[float], list[float], list[float], list[Any]]:
    """(flowcore totals, compile times, floors, results) over `reps` alternating repetitions.

    With `new_values`, each run gets its own seed, so its values were never stored before
    (no run can skip a write because an earlier one stored the same content)."""
    dirs: list[str] = []
    stack = _new_stack(kind, dirs)
    totals: list[float] = []
    compiles: list[float] = []
    floors: list[float] = []
    results: list[Any] = []
    try:
        async with stack:
            await _timed(p, stack, {"n": n})  # warm-up (for a cached shape: fills the cache)
            for rep in range(reps):
                params = {"n": n, "seed": (rep + 1) * 1_000_000 if new_values else 0}
                gc.collect()
                floors.append(await floor(n))
                gc.collect()
                if expect_failure:
                    FAILED_AT.clear()
                total, comp, result = await _timed(p, stack, params)
                returned = perf()
                if isinstance(result, BaseException) != expect_failure:
                    raise RuntimeError(f"{p.name}(n={n}) ended unexpectedly: {result!r}")
                totals.append(total)
                compiles.append(comp)
                # FAIL_FAST: seconds from the failing step's raise to run() returning.
                results.append(returned - FAILED_AT[0] if expect_failure else result)
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    return totals, compiles, floors, results


def med(xs: list[float]) -> float:
    return statistics.median(xs)


async def run_suite(kind: str, reps: int, big: bool, only: set[str]) -> list[Cell]:
    default = kind != "memory"
    cells: list[Cell] = []

    def want(name: str) -> bool:
        return not only or name in only

    sizes = [(1_000, 100, 200, 100)] + ([(10_000, 10_000, 10_000, 10_000)] if big else [])
    for fan_n, chain_n, sleep_n, cache_n in sizes:
        if want("fanout"):
            t, c, f, _ = await measure(kind, d_fan, fan_n, floor_fan, reps)
            steps = fan_n + 2
            limit = 100e-6 if default else 50e-6
            cells.append(Cell(f"{fan_n:,}-wide fan-out, per step", "step", steps, med(f), med(t),
                              med(c), f"<= {limit * 1e6:.0f} us", med(t) / steps <= limit, len(t)))
        if want("chain"):
            t, c, f, _ = await measure(kind, d_chain, chain_n, floor_chain, reps)
            limit = 150e-6 if default else 50e-6
            cells.append(Cell(f"{chain_n:,}-link chain, per link", "step", chain_n, med(f), med(t),
                              med(c), f"<= {limit * 1e6:.0f} us", med(t) / chain_n <= limit, len(t)))
        if want("sleep"):
            t, c, f, _ = await measure(kind, d_sleepers, sleep_n, floor_sleepers, reps)
            ok = med(t) <= 1.3 * med(f) if default else None
            cells.append(Cell(f"{sleep_n:,} parallel 50 ms sleeps, wall", "wall", sleep_n, med(f),
                              med(t), med(c), "<= 1.3x floor" if default else "", ok, len(t)))
        if want("cached"):
            t, c, f, _ = await measure(kind, d_cached, cache_n, floor_cached, reps,
                                       new_values=False)
            steps = cache_n + 1
            limit = 100e-6 if default else 50e-6
            cells.append(Cell(f"cached re-run of a {cache_n:,}-wide run, per step", "step", steps,
                              med(f), med(t), med(c), f"<= {limit * 1e6:.0f} us",
                              med(t) / steps <= limit, len(t)))
    if want("failfast"):
        t, c, f, failed = await measure(kind, d_fail_fast, 10, floor_fail_fast, reps,
                                        expect_failure=True)
        latency = med(failed)
        cells.append(Cell("FAIL_FAST, 10 steps, wall", "wall", 10, med(f), med(t), med(c),
                          "returns <= 15 ms after the failure", latency <= 0.015, len(t),
                          f"failure -> return {latency * 1e3:.1f} ms"))
    return cells
