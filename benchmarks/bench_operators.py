"""Step-operator and dynamic fan-out benchmarks: flowcore beside raw counterparts, same process.

    python benchmarks/bench_operators.py [--quick] [--repeat N] [--only cpu,map] [--diagnose]
                                         [--profile local|process|dask|map|static]

Prints a markdown table. Every figure is the median of `--repeat` repetitions (default 3; 1
with --quick), each after a `gc.collect()`, with the garbage collector left on. Within one
repetition the flowcore run and its raw counterpart run back to back, so both see the same
machine load.

1. CPU-bound fan-out. `source -> N x spin -> gather_all`: `spin` is a sync `def` step that burns
   ~5 ms of pure Python (a loop calibrated once at start-up; the real per-call time is
   printed); the fan-in gets the N results as a list of handles (data, not `after=`), so every
   step ships an input and a result. N = 1,000 (--quick: 200). It runs on:
   a. the default local operator (sync bodies in flowcore's worker threads), beside the same N
      calls through `loop.run_in_executor` on a 64-thread pool (flowcore's pool size);
   b. `ProcessStepOperator(max_workers=2)`, beside `concurrent.futures.ProcessPoolExecutor(2)`
      (forkserver, like the operator) `.map` of the same function;
   c. `DaskStepOperator(n_workers=2, processes=True, threads_per_worker=1)` (its own
      LocalCluster), beside raw `client.submit` x N + `client.gather` on the same cluster and
      the same asynchronous client. With --diagnose, two more rows split the gap: raw submits
      of flowcore's own call shape (`_dask_call(func, kwargs, is_async)`, the function shipped
      as an argument) and raw submits each awaited by its own asyncio task (one result fetch
      per future, as a step does).
   Pools, workers and the cluster are started and warmed up before timing (a warm-up run);
   their start-up is printed below the table, not timed. `parent CPU` is the CPU time of this
   process (all its threads, including the Dask scheduler, which a LocalCluster runs here) per
   step: on 2 cores whatever the parent burns is taken from the workers.
2. Dynamic fan-out. `make_items -> inc.map(items) -> total` (1,000 elements, async `inc`)
   versus the static `make_items; total([inc(i, after=items) for i in range(1000)])`, on
   `Stack.in_memory()`, caching off; then both with caching on: the first run (empty cache)
   and the fully cached second run on the same stack.

Figures are `await pipeline.run()` wall time end to end (compile + run), on
`Stack.in_memory()` with `enable_cache=False` unless noted. Overhead per step is
(flowcore - raw) / N.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flowcore import Stack, StepStatus, pipeline, step
from flowcore.stack import DaskStepOperator, ProcessStepOperator

perf = time.perf_counter
cpu = time.process_time

logging.getLogger("flowcore").addHandler(logging.NullHandler())


# --------------------------------------------------------------------------------------------
# The CPU-bound body and its steps (module level: worker processes re-import this module)


def spin(x: int, iters: int) -> int:
    """Burn CPU in pure Python: `iters` loop turns (calibrated to ~5 ms)."""
    acc = x
    for i in range(iters):
        acc ^= i
    return acc & 1


def timed_spin(iters: int) -> float:
    """One `spin` call timed where it runs (for the per-call time inside a worker)."""
    t0 = perf()
    spin(0, iters)
    return perf() - t0


spin_step = step(enable_cache=False)(spin)


@step(enable_cache=False)
async def source() -> int:
    return 0


@step(enable_cache=False)
async def gather_all(xs: list[int]) -> int:
    return len(xs)


@pipeline(enable_cache=False)
def cpu_fan(n: int, iters: int, operator: str = "") -> None:
    """source -> n x spin (on `operator`, "" = local) -> gather_all(list of n handles)."""
    body = spin_step.with_options(step_operator=operator) if operator else spin_step
    s = source()
    gather_all([body(s, iters=iters) for _ in range(n)])


# --------------------------------------------------------------------------------------------
# Dynamic fan-out: `.map()` versus a static loop; caching off and on


@step(enable_cache=False)
async def make_items(n: int) -> list[int]:
    return list(range(n))


@step(enable_cache=False)
async def inc(x: int) -> int:
    return x + 1


@step(enable_cache=False)
async def total(xs: list[int]) -> int:
    return sum(xs)


@pipeline(enable_cache=False)
def mapped(n: int) -> None:
    total(inc.map(make_items(n)))


@pipeline(enable_cache=False)
def static(n: int) -> None:
    items = make_items(n)
    total([inc(i, after=items) for i in range(n)])


# Cacheable twins (no step-level enable_cache, so the pipeline's enable_cache=True applies).
@step
async def c_make_items(n: int) -> list[int]:
    return list(range(n))


@step
async def c_inc(x: int) -> int:
    return x + 1


@step
async def c_total(xs: list[int]) -> int:
    return sum(xs)


@pipeline(enable_cache=True)
def c_mapped(n: int) -> None:
    c_total(c_inc.map(c_make_items(n)))


@pipeline(enable_cache=True)
def c_static(n: int) -> None:
    items = c_make_items(n)
    c_total([c_inc(i, after=items) for i in range(n)])


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Stats:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu_s: float = 0.0) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu_s)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def spread(self) -> str:
        if len(self.wall) < 2:
            return ""
        lo, hi = min(self.wall), max(self.wall)
        if self.median < 0.1:
            return f" ({lo * 1e3:.1f}-{hi * 1e3:.1f} ms)"
        return f" ({lo:.2f}-{hi:.2f})"


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, float, Any]:
    """(wall seconds, this process's CPU seconds, result) of one awaited call, after a gc."""
    gc.collect()
    c0, t0 = cpu(), perf()
    result = await fn()
    return perf() - t0, cpu() - c0, result


def check_run(run: Any, n_spin: int | None = None) -> None:
    if str(run.status) != "completed":
        raise RuntimeError(f"run {run.name} ended {run.status}")
    if n_spin is not None:
        done = sum(1 for name, sr in run.steps.items()
                   if name.startswith("spin") and sr.status is StepStatus.COMPLETED)
        if done != n_spin:
            raise RuntimeError(f"run {run.name}: {done} spin steps completed, not {n_spin}")


def calibrate(target: float = 0.005) -> tuple[int, float]:
    """Loop turns for one `spin` call of ~`target` seconds here, and the measured median."""
    iters = 20_000
    for _ in range(4):
        t = statistics.median(timed_spin(iters) for _ in range(5))
        iters = max(1_000, int(iters * target / t))
    per_call = statistics.median(timed_spin(iters) for _ in range(21))
    return iters, per_call


# --------------------------------------------------------------------------------------------
# Table


@dataclass
class Row:
    workload: str
    flowcore: str
    raw: str
    overhead: str
    ratio: str
    parent_cpu: str
    target: str
    verdict: str


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def secs(seconds: float) -> str:
    if seconds < 0.1:
        return f"{seconds * 1e3:,.1f} ms"
    return f"{seconds:,.3f} s"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def error_row(workload: str, exc: BaseException) -> Row:
    msg = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
    return Row(workload, f"error: {msg[:160]}", "", "", "", "", "", "ERROR")


def compare_row(label: str, fc: Stats, raw: Stats, raw_label: str, n: int,
                target: str = "", limit: float | None = None) -> Row:
    ratio = fc.median / raw.median
    paired = ""
    if len(fc.wall) > 1:
        # Each repetition ran the two back to back: the median of the per-repetition ratios
        # is less sensitive to the load drifting between repetitions.
        per_rep = [f / r for f, r in zip(fc.wall, raw.wall, strict=True)]
        paired = f" (paired {statistics.median(per_rep):.2f}x)"
    return Row(
        label,
        f"{secs(fc.median)}{fc.spread}",
        f"{secs(raw.median)}{raw.spread} {raw_label}",
        us((fc.median - raw.median) / n),
        f"{ratio:.2f}x{paired}",
        f"{us(fc.cpu_median / n)} / {us(raw.cpu_median / n)}",
        target,
        verdict(ratio <= limit) if limit is not None else "",
    )


# --------------------------------------------------------------------------------------------
# 1. CPU-bound fan-out on the three operators


class CpuBench:
    def __init__(self, n: int, iters: int, repeat: int, diagnose: bool = False) -> None:
        self.n = n
        self.iters = iters
        self.repeat = repeat
        self.diagnose = diagnose
        self.process_op = ProcessStepOperator(max_workers=2)
        self.dask_op = DaskStepOperator(n_workers=2, processes=True, threads_per_worker=1)
        self.operators = {"process": self.process_op, "dask": self.dask_op}
        self.threads = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="raw")
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.client: Any = None
        self.notes: list[str] = []

    def stack(self) -> Stack:
        return Stack.in_memory().with_components(step_operators=self.operators)

    async def flowcore(self, operator: str, n: int | None = None) -> Any:
        n = self.n if n is None else n
        run = await cpu_fan.with_options(stack=self.stack()).run(
            n=n, iters=self.iters, operator=operator)
        check_run(run, n)
        return run

    # -- raw counterparts -------------------------------------------------------------------

    async def raw_threads(self) -> Any:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*[loop.run_in_executor(self.threads, spin, 0, self.iters)
                                      for _ in range(self.n)])

    async def raw_pool(self) -> Any:
        assert self.pool is not None
        pool, n, iters = self.pool, self.n, self.iters
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: list(pool.map(spin, [0] * n, [iters] * n)))

    async def raw_dask(self) -> Any:
        client = self.client
        futures = [client.submit(spin, 0, self.iters, pure=False) for _ in range(self.n)]
        return await client.gather(futures)

    async def raw_dask_call_shape(self) -> Any:
        """flowcore's submission shape: the body travels as an argument of `_dask_call`."""
        from flowcore.stack._operators import _dask_call

        client = self.client
        futures = [client.submit(_dask_call, spin, {"x": 0, "iters": self.iters}, False,
                                 pure=False, priority=0) for _ in range(self.n)]
        return await client.gather(futures)

    async def raw_dask_per_task(self) -> Any:
        """One asyncio task per submit, each awaiting its own future (flowcore's await shape)."""
        client = self.client

        async def one() -> Any:
            return await client.submit(spin, 0, self.iters, pure=False)

        return await asyncio.gather(*[asyncio.create_task(one()) for _ in range(self.n)])

    # -- set-up and tear-down ---------------------------------------------------------------

    async def start(self) -> None:
        warm = max(20, self.n // 20)
        t = perf()
        self.pool = concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context("forkserver"))
        worker_times = await asyncio.get_running_loop().run_in_executor(
            None, lambda: list(self.pool.map(timed_spin, [self.iters] * 20)))  # type: ignore[union-attr]
        self.notes.append(
            f"ProcessPoolExecutor(2) start + 20 calls: {secs(perf() - t)}; one `spin` call "
            f"inside a pool worker: {ms(statistics.median(worker_times))} (median of 20)")
        t = perf()
        await self.flowcore("process", warm)
        self.notes.append(f"ProcessStepOperator warm-up run ({warm} steps, starts 2 workers): "
                          f"{secs(perf() - t)}")
        t = perf()
        await self.dask_op.start()
        self.notes.append(f"DaskStepOperator LocalCluster start: {secs(perf() - t)}")
        # The operator's own asynchronous client (private): the raw figures use the very same
        # connection, scheduler and workers.
        self.client = await self.dask_op._client()
        t = perf()
        await self.flowcore("dask", warm)
        await self.raw_dask()
        self.notes.append(f"Dask warm-up ({warm}-step flowcore run + one raw batch): "
                          f"{secs(perf() - t)}")
        await self.flowcore("", warm)
        await self.raw_threads()

    async def close(self) -> None:
        self.client = None
        with contextlib.suppress(Exception):
            await self.stack().close()  # stops both operators (pool workers, cluster, client)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.threads.shutdown(wait=False, cancel_futures=True)

    # -- the table rows ---------------------------------------------------------------------

    async def rows(self, verbose: bool) -> list[Row]:
        pairs: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("local", lambda: self.flowcore("")),
            ("threads", self.raw_threads),
            ("process", lambda: self.flowcore("process")),
            ("pool", self.raw_pool),
            ("dask", lambda: self.flowcore("dask")),
            ("raw_dask", self.raw_dask),
        ]
        if self.diagnose:
            pairs += [("raw_dask_call", self.raw_dask_call_shape),
                      ("raw_dask_tasks", self.raw_dask_per_task)]
        stats = {name: Stats() for name, _ in pairs}
        for rep in range(self.repeat):
            for name, fn in pairs:
                wall, used, _ = await timed(fn)
                stats[name].add(wall, used)
                if verbose:
                    print(f"    rep {rep + 1} {name:>15}: {wall:6.2f} s (parent CPU {used:.2f} s)",
                          file=sys.stderr, flush=True)
        n = self.n
        what = f"{n:,} x ~5 ms sync steps"
        rows = [
            compare_row(f"1a. {what}, local operator (worker threads)", stats["local"],
                        stats["threads"], "(`run_in_executor`, 64 threads)", n),
            compare_row(f"1b. {what}, `ProcessStepOperator(max_workers=2)`", stats["process"],
                        stats["pool"], "(`ProcessPoolExecutor(2).map`)", n),
            compare_row(f"1c. {what}, `DaskStepOperator` (LocalCluster 2 x 1 thread)",
                        stats["dask"], stats["raw_dask"],
                        "(`client.submit` x N + `gather`)", n,
                        "≤ 1.20x raw Dask", 1.20),
        ]
        if not self.diagnose:
            return rows
        return [
            *rows,
            compare_row("1c'. diagnostic: raw Dask, flowcore's call shape "
                        "(`submit(_dask_call, func, kwargs, False)`)",
                        stats["raw_dask_call"], stats["raw_dask"], "(raw Dask)", n),
            compare_row("1c''. diagnostic: raw Dask, one asyncio task awaiting each future",
                        stats["raw_dask_tasks"], stats["raw_dask"], "(raw Dask)", n),
        ]


# --------------------------------------------------------------------------------------------
# 2. Dynamic fan-out: `.map()` versus a static loop


async def run_on(p: Any, stack: Stack, n: int) -> Any:
    run = await p.with_options(stack=stack).run(n=n)
    check_run(run)
    return run


async def map_rows(n: int, repeat: int, verbose: bool) -> list[Row]:
    stats = {k: Stats() for k in ("map", "static", "c_map1", "c_map2", "c_static1", "c_static2")}

    async def plain(p: Any) -> Any:
        return await run_on(p, Stack.in_memory(), n)

    # warm-up (imports, first compile)
    await plain(mapped)
    await plain(static)
    for rep in range(repeat):
        for key, p in (("map", mapped), ("static", static)):
            wall, used, _ = await timed(lambda p=p: plain(p))
            stats[key].add(wall, used)
        for key, p in (("c_map", c_mapped), ("c_static", c_static)):
            stack = Stack.in_memory()
            wall, used, _ = await timed(lambda p=p, stack=stack: run_on(p, stack, n))
            stats[f"{key}1"].add(wall, used)
            wall, used, second = await timed(lambda p=p, stack=stack: run_on(p, stack, n))
            stats[f"{key}2"].add(wall, used)
            element = [sr for name, sr in second.steps.items() if name.startswith("c_inc")
                       and ("[" in name or p is c_static)]
            not_cached = [sr.name for sr in element if sr.status is not StepStatus.CACHED]
            if len(element) != n or not_cached:
                raise RuntimeError(f"{p.name}: re-run not fully cached ({len(element)} "
                                   f"elements, {len(not_cached)} not cached)")
        if verbose:
            print(f"    rep {rep + 1}: " + ", ".join(f"{k} {s.wall[-1]:.3f} s"
                                                   for k, s in stats.items()),
                  file=sys.stderr, flush=True)
    label = f"{n:,}-element `.map()` of an async no-op vs a static {n:,}-step loop"
    return [
        compare_row(f"2a. {label}, caching off", stats["map"], stats["static"], "(static)", n,
                    "map ≤ 2x static", 2.0),
        compare_row(f"2b. {label}, caching on, first run (empty cache)", stats["c_map1"],
                    stats["c_static1"], "(static)", n),
        compare_row(f"2c. {label}, caching on, fully cached second run", stats["c_map2"],
                    stats["c_static2"], "(static)", n, "map ≤ 2x static", 2.0),
    ]


# --------------------------------------------------------------------------------------------
# Profiling (optional; needs pyinstrument; main thread only)


async def profile(what: str, n_cpu: int, n_map: int, iters: int) -> None:
    from pyinstrument import Profiler

    prof = Profiler(interval=0.0005, async_mode="disabled")
    if what in ("map", "static"):
        await run_on(mapped if what == "map" else static, Stack.in_memory(), n_map)
        prof.start()
        await run_on(mapped if what == "map" else static, Stack.in_memory(), n_map)
        prof.stop()
    else:
        b = CpuBench(n_cpu, iters, 1)
        try:
            await b.start()
            op = "" if what == "local" else what
            prof.start()
            await b.flowcore(op)
            prof.stop()
        finally:
            await b.close()
    print(prof.output_text(unicode=True, color=False, show_all=False))


# --------------------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    return (f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


async def main(args: argparse.Namespace) -> int:
    n_cpu = 200 if args.quick else 1_000
    n_map = 1_000
    t_start = perf()
    load_before = load()
    iters, per_call = calibrate()
    print(f"... calibrated: spin({iters:,} turns) = {ms(per_call)} per call here",
          file=sys.stderr, flush=True)
    if args.profile:
        await profile(args.profile, n_cpu, n_map, iters)
        return 0
    rows: list[Row] = []
    notes: list[str] = []
    if "cpu" in args.only:
        print(f"... cpu: {n_cpu:,} steps x {args.repeat} repetitions", file=sys.stderr,
              flush=True)
        b = CpuBench(n_cpu, iters, args.repeat, args.diagnose)
        try:
            await b.start()
            rows.extend(await b.rows(verbose=True))
        except Exception as exc:
            rows.append(error_row("1. CPU-bound fan-out", exc))
        finally:
            await b.close()
            notes.extend(b.notes)
    if "map" in args.only:
        print(f"... map: {n_map:,} elements x {args.repeat} repetitions", file=sys.stderr,
              flush=True)
        try:
            rows.extend(await map_rows(n_map, args.repeat, verbose=True))
        except Exception as exc:
            rows.append(error_row("2. dynamic fan-out", exc))

    today = datetime.now(UTC).strftime("%Y-%m-%d")
    print(f"### flowcore step-operator benchmark{' (--quick)' if args.quick else ''}, {today}\n")
    print(f"Machine: {machine()}; load average (1, 5, 15 min) before: {load_before}; "
          f"after: {load()}.  ")
    print(f"`spin` = {iters:,} loop turns = {ms(per_call)} per call in this process "
          f"(median of 21), i.e. {secs(per_call * n_cpu)} of CPU for {n_cpu:,} calls, "
          f"{secs(per_call * n_cpu / 2)} ideal on 2 workers.  ")
    print(f"Each figure is the median of {args.repeat} repetition(s) (min-max in brackets); "
          "flowcore figures are `await pipeline.run()` end to end on `Stack.in_memory()`. "
          "Overhead/step = (flowcore - raw) / N; ratio = flowcore / raw (of the medians; "
          "paired = median of the per-repetition ratios); parent CPU = this process's CPU "
          "time per step, flowcore / raw.\n")
    print("| workload | flowcore | raw counterpart | overhead/step | ratio | parent CPU/step "
          "| target | result |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.workload} | {r.flowcore} | {r.raw} | {r.overhead} | {r.ratio} "
              f"| {r.parent_cpu} | {r.target} | {r.verdict} |")
    if notes:
        print("\nSet-up, not timed above:\n")
        for note in notes:
            print(f"- {note}")
    print(f"\n(total benchmark time {perf() - t_start:.0f} s)")
    return 0


ONLY = ("cpu", "map")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="200 CPU-bound steps instead of 1,000, one repetition")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions per figure (3)")
    ap.add_argument("--only", default=",".join(ONLY),
                    help=f"comma-separated subset of: {', '.join(ONLY)}")
    ap.add_argument("--diagnose", action="store_true",
                    help="two more raw Dask rows that split the Dask operator's gap (+~50 %% time)")
    ap.add_argument("--profile", choices=("local", "process", "dask", "map", "static"),
                    default=None,
                    help="print a pyinstrument profile of one flowcore run instead of the table")
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.only - set(ONLY)
    if unknown:
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
