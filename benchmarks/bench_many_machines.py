"""Many machines (API.md §18): Dask steps that move their own data, and the shared stores.

    python benchmarks/bench_many_machines.py [--repeat N] [--megabytes M] [--only dask,stores]

Starts what it measures against, on 127.0.0.1: a moto S3 server (subprocess) and, for
`stores`, a private PostgreSQL cluster (as tests/_postgres_server.py does). Prints markdown.

1. `dask`: `make_big(M MB numpy array) -> total_on_worker(array)`, both steps on a
   `DaskStepOperator` (a LocalCluster of 2 worker processes, started and warmed up before
   timing). Without a remote artifact store (a local directory) the driver gathers the array
   from the worker, stores it, and ships it to the next worker; with an S3 artifact store the
   workers load and store it themselves and the driver passes references. Reported: the
   driver's traced peak (tracemalloc: Python and numpy allocations of this process) and wall
   time, median of `--repeat`.
2. `stores`: per-step cost of a 100-wide fan-out, a 20-link chain and a cached re-run of the
   fan-out on the SQLite stack and on Postgres + S3, beside the bare-asyncio floor of the same
   shape in the same run (steps return distinct small ints).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _s3_server import DUMMY_KEY, moto_server, s3_filesystem

from flowcore import Stack, pipeline, step
from flowcore.stack import DaskStepOperator

MB = 1024 * 1024


@step(step_operator="dask", enable_cache=False)
def make_big(megabytes: int) -> np.ndarray:
    return np.ones(megabytes * MB // 8)


@step(step_operator="dask", enable_cache=False)
def total_on_worker(big: np.ndarray) -> float:
    return float(big.sum())


@pipeline
def dask_data(megabytes: int = 50) -> None:
    total_on_worker(make_big(megabytes))


def _measure(run: Callable[[], Any]) -> tuple[float, float]:
    """(traced peak in MB, wall seconds) of one call."""
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        run()
        wall = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / MB, wall


def bench_dask(endpoint: str, root: Path, repeat: int, megabytes: int) -> list[str]:
    from distributed import LocalCluster

    bucket = "bench-dask"
    s3_filesystem(endpoint).mkdir(bucket)
    options = {"endpoint_url": endpoint, "key": DUMMY_KEY, "secret": DUMMY_KEY}
    rows = []
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                      dashboard_address=":0") as cluster:
        operator = {"dask": DaskStepOperator(address=cluster.scheduler_address)}
        stacks = {
            "local artifact directory": Stack.local(root / "local").with_components(
                step_operators=operator),
            "S3 artifact store": Stack.from_urls(
                metadata=str(root / "remote"), artifacts=f"s3://{bucket}/flowcore",
                storage_options=options).with_components(step_operators=operator),
        }
        for label, stack in stacks.items():
            p = dask_data.with_options(stack=stack)
            p(megabytes=1)  # warm-up: imports, connections
            peaks, walls = [], []
            for _ in range(repeat):
                peak, wall = _measure(lambda p=p: p(megabytes=megabytes))
                peaks.append(peak)
                walls.append(wall)
            rows.append(f"| {label} | {megabytes} MB | {statistics.median(peaks):.1f} MB | "
                        f"{statistics.median(walls):.2f} s |")
    return ["| artifact store | data | driver's traced peak | wall |", "|---|---|---|---|", *rows]


# -- per-step costs on the shared stores ---------------------------------------------------------


@step(enable_cache=False)
def leaf(i: int) -> int:
    return i * 7 + 1


@step(enable_cache=True)
def cached_leaf(i: int) -> int:
    return i * 7 + 1


@step(enable_cache=False)
def link(x: int) -> int:
    return x + 1


@pipeline
def fanout(width: int = 100) -> None:
    for i in range(width):
        leaf(i)


@pipeline
def cached_fanout(width: int = 100) -> None:
    for i in range(width):
        cached_leaf(i)


@pipeline
def chain(length: int = 20) -> None:
    x = link(0)
    for _ in range(length - 1):
        x = link(x)


async def _floor_fanout(width: int) -> None:
    async def body(i: int) -> int:
        await asyncio.sleep(0)
        return i * 7 + 1

    async with asyncio.TaskGroup() as tg:
        for i in range(width):
            tg.create_task(body(i))


async def _floor_chain(length: int) -> None:
    async def body(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    x = 0
    for _ in range(length):
        x = await asyncio.create_task(body(x))


async def _timed(make: Callable[[], Any], repeat: int) -> float:
    walls = []
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        await make()
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


async def _store_rows(stack: Stack, label: str, repeat: int) -> list[str]:
    width, length = 100, 20
    await fanout.with_options(stack=stack).run(width=10)  # warm-up: open, migrate, connect
    rows = []
    shapes: list[tuple[str, int, Callable[[], Any], Callable[[], Any]]] = [
        ("100-wide fan-out, per step", width,
         lambda: fanout.with_options(stack=stack).run(width=width), lambda: _floor_fanout(width)),
        ("20-link chain, per link", length,
         lambda: chain.with_options(stack=stack).run(length=length), lambda: _floor_chain(length)),
    ]
    await cached_fanout.with_options(stack=stack).run(width=width)  # fill the cache
    shapes.append(("cached re-run of 100-wide, per step", width,
                   lambda: cached_fanout.with_options(stack=stack).run(width=width),
                   lambda: _floor_fanout(width)))
    for shape, n, run, floor in shapes:
        flowcore_s = await _timed(run, repeat)
        floor_s = await _timed(floor, repeat)
        rows.append(f"| {shape} | {label} | {floor_s / n * 1e6:.0f} us | "
                    f"{flowcore_s / n * 1e6:.0f} us |")
    await stack.close()
    return rows


@contextlib.contextmanager
def _postgres() -> Iterator[Callable[[str], str]]:
    """A private PostgreSQL server; yields a function making a fresh database's URL."""
    from _postgres_server import create_database, running_postgres

    with running_postgres() as server:
        yield lambda name: create_database(server, name)


def bench_stores(endpoint: str, root: Path, repeat: int) -> list[str]:
    bucket = "bench-stores"
    s3_filesystem(endpoint).mkdir(bucket)
    options = {"endpoint_url": endpoint, "key": DUMMY_KEY, "secret": DUMMY_KEY}
    rows = ["| shape | stack | asyncio floor | flowcore |", "|---|---|---|---|"]
    rows += asyncio.run(_store_rows(Stack.local(root / "sqlite"), "SQLite + local", repeat))
    with _postgres() as database:
        # Postgres with local artifacts first: the metadata store's share of the cost.
        local = Stack.from_urls(metadata=database("bench_local"),
                                artifacts=str(root / "pg-artifacts"))
        rows += asyncio.run(_store_rows(local, "Postgres + local", repeat))
        stack = Stack.from_urls(metadata=database("bench_s3"), artifacts=f"s3://{bucket}/flowcore",
                                storage_options=options)
        rows += asyncio.run(_store_rows(stack, "Postgres + S3", repeat))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--only", default="dask,stores")
    args = parser.parse_args()
    only = set(args.only.split(","))
    os.environ.setdefault("AWS_ACCESS_KEY_ID", DUMMY_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", DUMMY_KEY)
    with tempfile.TemporaryDirectory(prefix="flowcore-bench-") as tmp:
        root = Path(tmp)
        with moto_server(root) as endpoint:
            print(f"# bench_many_machines, {time.strftime('%Y-%m-%d %H:%M')}, "
                  f"python {sys.version.split()[0]}, {os.cpu_count()} cores\n")
            if "dask" in only:
                print("\n".join(bench_dask(endpoint, root, args.repeat, args.megabytes)) + "\n")
            if "stores" in only:
                print("\n".join(bench_stores(endpoint, root, args.repeat)) + "\n")


if __name__ == "__main__":
    main()
