"""Scheduler benchmarks: flowcore beside a plain-asyncio baseline measured in the same process.

    python benchmarks/bench_scheduler.py [--quick] [--stack memory|sqlite|default] [--repeat N]
                                         [--budget SECONDS] [--only NAME[,NAME...]]
                                         [--no-gc] [--profile fanout|compile]
    python benchmarks/bench_scheduler.py --suite issue11 [--stack memory|default] [--big]

`--suite issue11` measures issue 11's shapes (see `_durable_shapes.py`): distinct output
values per step, figures end to end including compile, beside the bare-asyncio floor of
the same run; `--big` adds the 10,000-step versions. `default` is the default stack
(SQLite + local artifacts in a fresh temporary directory), the same as `sqlite`.

Prints a markdown table. Every timing is the median of `--repeat` runs (default 5; 3 with
--quick), each on a fresh stack, after a `gc.collect()`, with the garbage collector left on (as
users have it). A measurement whose repetitions together exceed `--budget` seconds stops
early (after at least 3, or after 1 if a single repetition exceeds the budget); the table
says how many repetitions each median is over.

Flowcore figures are `await pipeline.run()` wall time, end to end (compile + prepare + run +
final writes). "sched" is that minus the compile time measured inside the same run, i.e. what
the scheduler and the store cost; overhead per step is (sched - baseline) / steps.
Pipelines use `enable_cache=False` unless noted. The default stack is `Stack.in_memory()`;
`--stack sqlite` uses `Stack.local(<fresh temporary directory>)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flowcore import ExecutionMode, RunFailedError, Stack, pipeline, step

perf = time.perf_counter

# flowcore logs through the stdlib logger "flowcore" and never configures it; a host app would
# attach a handler. A NullHandler keeps the failing step's ERROR event off stderr.
logging.getLogger("flowcore").addHandler(logging.NullHandler())


# --------------------------------------------------------------------------------------------
# Steps (module level, like users write them)


@step(enable_cache=False)
async def source() -> int:
    return 0


@step(enable_cache=False)
async def noop(x: int) -> int:
    return x


# Cacheable twins (no step-level enable_cache, so the pipeline's enable_cache=True applies).
@step
async def c_source() -> int:
    return 0


@step
async def c_noop(x: int, k: int) -> int:
    return x + k


@step
async def c_sink(xs: list[int]) -> int:
    return len(xs)


@step(enable_cache=False)
async def noop_none() -> None:
    return None


@step(enable_cache=False)
async def sink(xs: list[int]) -> int:
    return len(xs)


@step(enable_cache=False)
async def nap() -> None:
    await asyncio.sleep(0.05)


@step(enable_cache=False)
async def long_nap() -> None:
    await asyncio.sleep(10)


FAILED_AT: list[float] = []


class Boom(Exception):
    pass


@step(enable_cache=False)
async def fail_soon() -> None:
    await asyncio.sleep(0.05)  # let the 100 siblings start first
    FAILED_AT.append(perf())
    raise Boom("planned failure")


# --------------------------------------------------------------------------------------------
# Pipelines (n is a pipeline parameter: the function runs at compile time)


@pipeline(enable_cache=False)
def fan_list(n: int) -> None:
    """source -> n x noop -> sink(list of n handles)."""
    s = source()
    sink([noop(s) for _ in range(n)])


@pipeline(enable_cache=False)
def fan_after(n: int) -> None:
    """source -> n x noop (data) -> noop_none(after=[n handles]) (order-only fan-in)."""
    s = source()
    hs = [noop(s) for _ in range(n)]
    noop_none(after=hs)


@pipeline(enable_cache=False)
def fan_order_only(n: int) -> None:
    """noop_none -> n x noop_none(after=) -> noop_none(after=): no data, no artifacts."""
    s = noop_none()
    hs = [noop_none(after=s) for _ in range(n)]
    noop_none(after=hs)


@pipeline(enable_cache=False)
def chain(n: int) -> None:
    """source -> noop -> noop -> ... (n steps in all)."""
    x = source()
    for _ in range(n - 1):
        x = noop(x)


@pipeline(enable_cache=False)
def sleepers(n: int) -> None:
    """n independent steps, each awaiting asyncio.sleep(0.05)."""
    for _ in range(n):
        nap()


@pipeline(enable_cache=False, execution_mode=ExecutionMode.FAIL_FAST)
def fail_fast(n: int) -> None:
    """n siblings sleeping 10 s and one step failing after 50 ms."""
    for _ in range(n):
        long_nap()
    fail_soon()


@pipeline(enable_cache=True)
def cached(n: int) -> None:
    """c_source -> (n - 2) x c_noop(k=i) -> c_sink: n steps, each with its own cache key."""
    s = c_source()
    c_sink([c_noop(s, k=i) for i in range(n - 2)])


# --------------------------------------------------------------------------------------------
# Plain-asyncio baselines (the same shapes without flowcore)


async def _b_src() -> int:
    return 0


async def _b_noop(x: int) -> int:
    return x


async def _b_sink(xs: list[int]) -> int:
    return len(xs)


async def base_fan(n: int) -> float:
    t0 = perf()
    x = await asyncio.create_task(_b_src())
    results = await asyncio.gather(*[asyncio.create_task(_b_noop(x)) for _ in range(n)])
    await asyncio.create_task(_b_sink(results))
    return perf() - t0


async def base_chain(n: int) -> float:
    t0 = perf()
    x = await asyncio.create_task(_b_src())
    for _ in range(n - 1):
        x = await asyncio.create_task(_b_noop(x))
    return perf() - t0


async def base_sleepers(n: int) -> float:
    t0 = perf()
    await asyncio.gather(*[asyncio.sleep(0.05) for _ in range(n)])
    return perf() - t0


async def base_fail_fast(n: int) -> float:
    """Failure-to-return latency of a TaskGroup whose one task raises among n sleepers."""
    failed_at: list[float] = []

    async def fail() -> None:
        await asyncio.sleep(0.05)
        failed_at.append(perf())
        raise Boom("planned failure")

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(n):
                tg.create_task(asyncio.sleep(10))
            tg.create_task(fail())
    except* Boom:
        pass
    return perf() - failed_at[0]


async def base_cached(n: int) -> float:
    """Each task hashes its parameters and finds its result in a dict (a warm cache)."""

    def key(k: int) -> str:
        return hashlib.sha256(json.dumps({"step": "noop", "k": k}).encode()).hexdigest()

    cache = {key(k): k for k in range(n)}

    async def lookup(k: int) -> int:
        return cache[key(k)]

    t0 = perf()
    await asyncio.gather(*[asyncio.create_task(lookup(k)) for k in range(n)])
    return perf() - t0


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Stats:
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def k(self) -> int:
        return len(self.samples)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.repeat: int = args.repeat
        self.budget: float = args.budget
        self.stack_kind: str = args.stack
        self._dirs: list[str] = []

    # -- stacks -----------------------------------------------------------------------------

    def new_stack(self) -> Stack:
        if self.stack_kind == "memory":
            return Stack.in_memory()
        d = tempfile.mkdtemp(prefix="flowcore-bench-")
        self._dirs.append(d)
        return Stack.local(d)

    async def drop_stack(self, stack: Stack) -> None:
        with contextlib.suppress(Exception):
            await stack.close()
        while self._dirs:
            shutil.rmtree(self._dirs.pop(), ignore_errors=True)

    # -- repetition -------------------------------------------------------------------------

    @contextlib.contextmanager
    def gc_mode(self) -> Iterator[None]:
        """A full collection before each repetition; with --no-gc, no collector during it."""
        gc.collect()
        if not self.args.no_gc:
            yield
            return
        gc.disable()
        try:
            yield
        finally:
            gc.enable()

    async def paired(
        self,
        flowcore_once: Callable[[], Awaitable[float | tuple[float, ...]]],
        baseline_once: Callable[[], Awaitable[float]] | None = None,
        width: int = 1,
    ) -> tuple[list[Stats], Stats]:
        """Alternate baseline and flowcore repetitions, so both see the same machine load."""
        fc = [Stats() for _ in range(width)]
        base = Stats()
        spent = 0.0
        for _ in range(self.repeat):
            t0 = perf()
            if baseline_once is not None:
                with self.gc_mode():
                    base.samples.append(await baseline_once())
            with self.gc_mode():
                value = await flowcore_once()
            spent += perf() - t0
            values = value if isinstance(value, tuple) else (value,)
            for s, v in zip(fc, values, strict=True):
                s.samples.append(v)
            k = fc[0].k
            if spent > self.budget and (k >= 3 or k == 1):
                break
        return fc, base

    # -- flowcore runs ----------------------------------------------------------------------

    async def timed_run(self, p: Any, stack: Stack, **params: Any) -> tuple[float, float, Any]:
        """(run() seconds, compile seconds inside that run, the PipelineRun or error)."""
        configured = p.with_options(stack=stack)
        compile_times: list[float] = []
        inner = getattr(configured, "_compile", None)
        if inner is not None:
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
        total = perf() - t0
        if compile_times:
            comp = compile_times[0]
        else:  # private hook gone: compile separately
            t = perf()
            p.compile(**params)
            comp = perf() - t
        return total, comp, result

    async def flowcore_shape(
        self, p: Any, baseline_once: Callable[[], Awaitable[float]], **params: Any,
    ) -> tuple[Stats, Stats, Stats]:
        """(run() seconds, compile seconds inside it, baseline seconds)."""
        async def once() -> tuple[float, float]:
            stack = self.new_stack()
            try:
                total, comp, result = await self.timed_run(p, stack, **params)
                if isinstance(result, BaseException):
                    raise RuntimeError(f"{p.name} failed: {result!r}") from result
                return total, comp
            finally:
                await self.drop_stack(stack)

        (total, comp), base = await self.paired(once, baseline_once, width=2)
        return total, comp, base


# --------------------------------------------------------------------------------------------
# Table


@dataclass
class Row:
    shape: str
    flowcore: str
    baseline: str
    per_step: str
    overhead: str
    target: str
    verdict: str
    reps: str


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} µs"


def secs(seconds: float) -> str:
    if seconds < 0.1:
        return f"{seconds * 1e3:,.1f} ms"
    return f"{seconds:,.3f} s"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def error_row(shape: str, exc: BaseException) -> Row:
    msg = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
    return Row(shape, f"error: {msg[:160]}", "", "", "", "", "ERROR", "")


# --------------------------------------------------------------------------------------------
# Shapes


async def shape_fanout(b: Bench, n: int) -> list[Row]:
    rows = []
    steps = n + 2
    variants = [
        ("list", fan_list, f"fan-out {n:,}, fan-in by a list of {n:,} handles"),
        ("after", fan_after, f"fan-out {n:,}, fan-in by `after=` ({n:,} handles, order only)"),
        ("order", fan_order_only, f"fan-out {n:,}, no data at all (`after=` both ways)"),
    ]
    for key, p, label in variants:
        if b.args.only and key not in b.args.fan_variants:
            continue
        try:
            total, comp, base = await b.flowcore_shape(p, lambda: base_fan(n), n=n)
        except Exception as exc:
            rows.append(error_row(f"1. {label}", exc))
            continue
        sched = total.median - comp.median
        per = sched / steps
        overhead = (sched - base.median) / steps
        ratio = sched / base.median
        limit = 120e-6 if b.stack_kind == "sqlite" else 20e-6
        ok = overhead <= limit and (b.stack_kind == "sqlite" or ratio <= 6)
        target = ("≤ 120 µs/step persisted" if b.stack_kind == "sqlite"
                  else "overhead ≤ 20 µs/step and ≤ 6x baseline")
        rows.append(Row(
            f"1. {label} ({steps:,} steps)",
            f"run {secs(total.median)} (compile {secs(comp.median)}, sched {secs(sched)})",
            f"{secs(base.median)} ({us(base.median / steps)}/task)",
            f"sched {us(per)} ({ratio:,.1f}x baseline)",
            us(overhead),
            target,
            verdict(ok),
            f"{total.k} / {base.k}",
        ))
    return rows


async def shape_chain(b: Bench, n: int) -> list[Row]:
    total, comp, base = await b.flowcore_shape(chain, lambda: base_chain(n), n=n)
    sched = total.median - comp.median
    per = sched / n
    overhead = (sched - base.median) / n
    ratio = sched / base.median
    limit = 120e-6 if b.stack_kind == "sqlite" else 20e-6
    return [Row(
        f"2. chain of {n:,} steps",
        f"run {secs(total.median)} (compile {secs(comp.median)}, sched {secs(sched)})",
        f"{secs(base.median)} ({us(base.median / n)}/task)",
        f"sched {us(per)} ({ratio:,.1f}x baseline)",
        us(overhead),
        f"overhead ≤ {us(limit)}/step",
        verdict(overhead <= limit),
        f"{total.k} / {base.k}",
    )]


async def shape_sleepers(b: Bench, n: int) -> list[Row]:
    total, comp, base = await b.flowcore_shape(sleepers, lambda: base_sleepers(n), n=n)
    return [Row(
        f"3. {n:,} steps sleeping 50 ms in parallel",
        f"run {secs(total.median)} (compile {secs(comp.median)})",
        secs(base.median),
        "",
        us((total.median - base.median) / n),
        "total ≤ 0.120 s",
        verdict(total.median <= 0.12),
        f"{total.k} / {base.k}",
    )]


async def shape_fail_fast(b: Bench, n: int) -> list[Row]:
    async def once() -> float:
        stack = b.new_stack()
        FAILED_AT.clear()
        try:
            t0 = perf()
            _, _, result = await b.timed_run(fail_fast, stack, n=n)
            returned = perf()
            if not isinstance(result, RunFailedError):
                raise RuntimeError(f"expected RunFailedError, got {result!r}")
            if returned - t0 > 5:
                raise RuntimeError("FAIL_FAST did not cancel the sleeping siblings")
            return returned - FAILED_AT[0]
        finally:
            await b.drop_stack(stack)

    (latency,), base = await b.paired(once, lambda: base_fail_fast(n))
    return [Row(
        f"4. FAIL_FAST: failure among {n} siblings sleeping 10 s",
        f"{secs(latency.median)} from the failure to run() returning",
        f"{secs(base.median)} (TaskGroup)",
        "",
        "",
        "≤ 20 ms",
        verdict(latency.median <= 0.020),
        f"{latency.k} / {base.k}",
    )]


def _graphlib_baseline(n: int) -> tuple[float, int]:
    """Build and prepare a graphlib.TopologicalSorter of the fan-out shape: (s, bytes)."""
    import graphlib

    def build() -> Any:
        deps: dict[str, set[str]] = {"source": set()}
        mids = [f"noop_{i}" for i in range(n)]
        for m in mids:
            deps[m] = {"source"}
        deps["sink"] = set(mids)
        ts = graphlib.TopologicalSorter(deps)
        ts.prepare()
        return ts

    t0 = perf()
    build()
    elapsed = perf() - t0
    gc.collect()
    tracemalloc.start()
    kept = build()
    gc.collect()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return elapsed, size


async def shape_compile(b: Bench, n: int) -> list[Row]:
    nodes = n + 2
    t_target = 0.3 * n / 10_000
    base_mem = 0

    async def compile_once() -> float:
        t0 = perf()
        fan_list.compile(n=n)
        return perf() - t0

    async def graphlib_once() -> float:
        nonlocal base_mem
        dt, base_mem = _graphlib_baseline(n)
        return dt

    (times,), base_times = await b.paired(compile_once, graphlib_once)
    # Memory: what the compiled Graph keeps, per node (tracemalloc, graph alive, after gc).
    gc.collect()
    tracemalloc.start()
    graph = fan_list.compile(n=n)
    gc.collect()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(graph) == nodes
    del graph
    scaled = "" if n == 10_000 else f" (0.3 s x {n:,}/10,000)"
    return [
        Row(
            f"5a. compile a {nodes:,}-node fan-out (`pipeline.compile()`)",
            secs(times.median),
            f"{secs(base_times.median)} (graphlib.TopologicalSorter + prepare)",
            f"{us(times.median / nodes)}/node",
            "",
            f"≤ {t_target:.3g} s{scaled}",
            verdict(times.median <= t_target),
            f"{times.k} / {base_times.k}",
        ),
        Row(
            f"5b. memory per graph node ({nodes:,} nodes, tracemalloc)",
            f"{kept / nodes / 1024:,.2f} KB/node kept (peak {peak / nodes / 1024:,.2f} KB/node)",
            f"{base_mem / nodes / 1024:,.2f} KB/node (graphlib)",
            "",
            "",
            "≤ 3 KB/node",
            verdict(kept / nodes <= 3 * 1024),
            "1 / 1",
        ),
    ]


async def shape_cached(b: Bench, n: int) -> list[Row]:
    first_times: list[float] = []

    async def once() -> float:
        stack = b.new_stack()
        try:
            t_first, _, first = await b.timed_run(cached, stack, n=n)
            if isinstance(first, BaseException):
                raise RuntimeError(f"first run failed: {first!r}") from first
            first_times.append(t_first)
            total, _, second = await b.timed_run(cached, stack, n=n)
            if isinstance(second, BaseException):
                raise RuntimeError(f"second run failed: {second!r}") from second
            statuses = {str(s.status) for s in second.steps.values()}
            if statuses != {"cached"}:
                raise RuntimeError(f"re-run was not fully cached: {sorted(statuses)}")
            return total
        finally:
            await b.drop_stack(stack)

    (second,), base = await b.paired(once, lambda: base_cached(n))
    note = "" if b.stack_kind == "sqlite" else " (the SQLite target)"
    return [Row(
        f"6. fully cached re-run of {n:,} steps (`enable_cache=True`)",
        f"run {secs(second.median)} (first run, empty cache: {secs(statistics.median(first_times))})",
        f"{secs(base.median)} (hash + dict lookup per task)",
        f"{us(second.median / n)}/step",
        us((second.median - base.median) / n),
        f"≤ 0.25 s{note}",
        verdict(second.median <= 0.25),
        f"{second.k} / {base.k}",
    )]


# --------------------------------------------------------------------------------------------
# Profiling (optional; needs pyinstrument)


async def profile(b: Bench, what: str, n: int) -> None:
    from pyinstrument import Profiler

    prof = Profiler(interval=0.0005, async_mode="disabled")
    if what == "compile":
        prof.start()
        fan_list.compile(n=n)
        prof.stop()
    else:
        stack = b.new_stack()
        prof.start()
        await b.timed_run(fan_list, stack, n=n)
        prof.stop()
        await b.drop_stack(stack)
    print(prof.output_text(unicode=True, color=False, show_all=False))


# --------------------------------------------------------------------------------------------


SHAPES = ("fanout", "chain", "sleep", "failfast", "compile", "cached")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return (f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def print_issue11(cells: list[Any], stack: str, reps: int, load_before: str) -> None:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"### issue 11 shapes — stack `{stack}`, {today}\n")
    print(f"Machine: {machine()}; load average before: {load_before}; after: {load}.  ")
    print(f"Medians of {reps} repetitions alternating with the floor, after one warm-up run on "
          "the same stack. Per-step figures are end to end (compile included); `sched` "
          "excludes the compile.\n")
    print("| workload | asyncio floor | flowcore | ratio | sched | compile per node | target "
          "| result | reps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        per_node = c.compile / c.steps
        if c.unit == "step":
            floor = us(c.floor / c.steps)
            fc = us(c.total / c.steps)
            sched = us((c.total - c.compile) / c.steps)
        else:
            floor, fc, sched = secs(c.floor), secs(c.total), secs(c.total - c.compile)
        if c.extra:
            fc += f" ({c.extra})"
        result = "" if c.ok is None else verdict(c.ok)
        print(f"| {c.label} | {floor} | {fc} | {c.total / c.floor:,.1f}x | {sched} "
              f"| {us(per_node)} | {c.target} | {result} | {c.reps} |")


async def main(args: argparse.Namespace) -> int:
    if args.suite == "issue11":
        import _durable_shapes

        load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        kind = "memory" if args.stack == "memory" else "default"
        reps = args.repeat if args.repeat_given else 3
        cells = await _durable_shapes.run_suite(kind, reps, args.big, args.only)
        print_issue11(cells, kind, reps, load_before)
        return 0
    quick = args.quick
    sizes = {
        "fanout": 1_000 if quick else 10_000,
        "chain": 200 if quick else 1_000,
        "sleep": 1_000,
        "failfast": 100,
        "compile": 1_000 if quick else 10_000,
        "cached": 1_000,
    }
    b = Bench(args)
    if args.stack == "sqlite":
        try:
            probe = b.new_stack()
            await probe.metadata_store()
            await b.drop_stack(probe)
        except Exception as exc:
            print(f"--stack sqlite is not usable yet: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 2
    if args.profile:
        await profile(b, args.profile, sizes["compile" if args.profile == "compile"
                                             else "fanout"])
        return 0
    runners = {
        "fanout": shape_fanout,
        "chain": shape_chain,
        "sleep": shape_sleepers,
        "failfast": shape_fail_fast,
        "compile": shape_compile,
        "cached": shape_cached,
    }
    rows: list[Row] = []
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    t_start = perf()
    for name in SHAPES:
        if args.only and name not in args.only:
            continue
        print(f"... {name}", file=sys.stderr, flush=True)
        t = perf()
        try:
            rows.extend(await runners[name](b, sizes[name]))
        except Exception as exc:
            rows.append(error_row(name, exc))
        print(f"    {perf() - t:.1f} s", file=sys.stderr, flush=True)

    today = datetime.now(UTC).strftime("%Y-%m-%d")
    flags = "".join(f" {f}" for f, on in (("--quick", quick), ("--no-gc", args.no_gc)) if on)
    print(f"### flowcore scheduler benchmark — stack `{args.stack}`"
          f"{f' ({flags.strip()})' if flags else ''}, {today}\n")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"Machine: {machine()}; load average (1, 5, 15 min) before: {load_before}; "
          f"after: {load}.  ")
    print(f"Each figure is the median of up to {b.repeat} repetitions (column `reps`: flowcore "
          f"/ baseline; fewer when the repetitions together passed the {b.budget:g} s budget). "
          "`run` is `await pipeline.run()` end to end; `sched` = run - the compile inside it; "
          "overhead/step = (sched - baseline) / steps (for row 3 and 6: (run - baseline) / "
          "steps).\n")
    print("| shape | flowcore | plain asyncio baseline | flowcore per step | overhead/step "
          "| target | result | reps |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.shape} | {r.flowcore} | {r.baseline} | {r.per_step} | {r.overhead} "
              f"| {r.target} | {r.verdict} | {r.reps} |")
    print(f"\n(total benchmark time {perf() - t_start:.0f} s)")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="smaller shapes (1,000 fan-out, 200 chain, 1,000 compile), 3 repeats")
    ap.add_argument("--stack", choices=("memory", "sqlite", "default"), default="memory")
    ap.add_argument("--suite", choices=("classic", "issue11"), default="classic",
                    help="issue11: issue 11's shapes end to end beside the asyncio floor")
    ap.add_argument("--big", action="store_true",
                    help="with --suite issue11: also the 10,000-step versions")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions per figure (5)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds after which one figure stops repeating (default 60)")
    ap.add_argument("--only", default="",
                    help=f"comma-separated subset of: {', '.join(SHAPES)} "
                         "(fanout.list / fanout.after / fanout.order pick fan-out variants)")
    ap.add_argument("--no-gc", action="store_true",
                    help="disable the cyclic garbage collector during each timed repetition "
                         "(diagnostic: shows how much of a figure is GC)")
    ap.add_argument("--profile", choices=("fanout", "compile"), default=None,
                    help="print a pyinstrument profile of one run instead of the table")
    args = ap.parse_args(argv)
    if args.stack == "default":
        args.stack = "sqlite"
    args.repeat_given = args.repeat is not None
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.fan_variants = {s.split(".", 1)[1] for s in only if s.startswith("fanout.")}
    args.only = {s.split(".", 1)[0] for s in only}
    if only and "fanout" in args.only and not args.fan_variants:
        args.fan_variants = {"list", "after", "order"}
    unknown = args.only - set(SHAPES) if args.suite == "classic" else set()
    if unknown:
        ap.error(f"unknown shape(s): {', '.join(sorted(unknown))}")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
