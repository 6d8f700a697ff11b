"""Dynamic fan-out/fan-in with separate pipeline runs (the seed's "snapshots" pattern).

When the number of parallel operations is known only at run time (a database query, a
directory listing), a step can start one *separate pipeline run* per chunk and a later step can
aggregate their outputs. Each chunk then is a run of its own: it is monitored, retried and
inspected separately, and one failing chunk does not take the others down.

ZenML does this with run templates/snapshots and `Client` polling. In flowcore an async step
simply calls `chunk_pipeline.submit(...)` (a background run on the same event loop) for each
chunk, awaits the `RunHandle`s, and returns the run names; the fan-in step reads each run's
output through `AsyncClient` (the same stored runs any other process could read).

- `count_chunks` decides N from the data.
- `trigger_chunk_runs` starts N runs of `chunk_pipeline`, at most `max_parallel` at a time
  (resource management), waits for them and reports failed chunks instead of crashing (error
  handling).
- `aggregate` is the fan-in: it loads every successful chunk run's result via the client.

Run it with:  python examples/dynamic_fan_out_with_snapshots.py
"""

from __future__ import annotations

import asyncio
import logging
import tempfile

import flowcore
from flowcore import AsyncClient, RunFailedError, RunStatus, Stack, pipeline, step

# -- the per-chunk pipeline: one separate run per chunk ----------------------------------------


@step(enable_cache=False)
async def load_chunk(dataset: list[int], chunk_id: int, n_chunks: int) -> list[int]:
    await asyncio.sleep(0.05)  # pretend to read from a database
    return dataset[chunk_id::n_chunks]


@step(enable_cache=False)
def process_chunk(rows: list[int], chunk_id: int) -> dict[str, int]:
    if any(r < 0 for r in rows):
        raise ValueError(f"chunk {chunk_id} has negative rows")
    return {"chunk": chunk_id, "rows": len(rows), "total": sum(rows)}


@pipeline
def chunk_pipeline(dataset: list[int], chunk_id: int, n_chunks: int) -> None:
    process_chunk(load_chunk(dataset, chunk_id, n_chunks), chunk_id)


# -- the orchestrating pipeline ------------------------------------------------------------------


@step
def fetch_dataset(size: int, bad_row: int | None = None) -> list[int]:
    rows = list(range(1, size + 1))
    if bad_row is not None:
        rows[bad_row] = -1
    return rows


@step
def count_chunks(dataset: list[int], rows_per_chunk: int) -> int:
    # The fan-out width is data-driven: known only once the data has been seen.
    return max(1, -(-len(dataset) // rows_per_chunk))


@step(enable_cache=False)
async def trigger_chunk_runs(dataset: list[int], n_chunks: int, max_parallel: int = 3) -> list[str]:
    """Start one background run of `chunk_pipeline` per chunk and wait for all of them."""
    gate = asyncio.Semaphore(max_parallel)
    parent = flowcore.get_step_context().pipeline_run.name

    async def one(chunk_id: int) -> tuple[str, RunStatus]:
        async with gate:
            handle = chunk_pipeline.with_options(
                run_name=f"{parent}-chunk{chunk_id}",
            ).submit(dataset=dataset, chunk_id=chunk_id, n_chunks=n_chunks)
            try:
                run = await asyncio.wait_for(handle.wait(), timeout=60)
            except RunFailedError as exc:  # one bad chunk must not sink the others
                assert exc.run is not None
                run = exc.run
            return handle.run_name, run.status

    results = await asyncio.gather(*(one(i) for i in range(n_chunks)))
    for name, status in results:
        print(f"  {name}: {status.value.upper()}")
    return [name for name, _ in results]


@step(enable_cache=False)
async def aggregate(run_names: list[str]) -> dict[str, object]:
    """The fan-in: read every chunk run's output through the client."""
    client = AsyncClient()
    totals, failed = [], []
    for name in run_names:
        run = await client.get_pipeline_run(name)
        if run.status is not RunStatus.COMPLETED:
            failed.append(name)
            continue
        totals.append(await run.steps["process_chunk"].output.aload())
    return {
        "chunks": len(run_names),
        "rows": sum(t["rows"] for t in totals),
        "total": sum(t["total"] for t in totals),
        "failed_chunks": failed,
    }


@pipeline
def dynamic_fan_out(size: int = 20, rows_per_chunk: int = 4, bad_row: int | None = None) -> None:
    dataset = fetch_dataset(size, bad_row)
    n_chunks = count_chunks(dataset, rows_per_chunk)
    run_names = trigger_chunk_runs(dataset, n_chunks)
    aggregate(run_names)


async def app(stack: Stack) -> None:
    try:
        await show(stack)
    finally:
        await stack.close()  # close the store opened on this event loop


async def show(stack: Stack) -> None:
    print("1) 20 rows, 4 per chunk: five separate chunk runs, three at a time")
    run = await dynamic_fan_out.run(size=20, rows_per_chunk=4)
    print(f"  aggregate: {run.steps['aggregate'].output.load()}")

    print("\n2) 30 rows, one bad row: six chunk runs, one fails, the rest are aggregated")
    run = await dynamic_fan_out.run(size=30, rows_per_chunk=5, bad_row=7)
    print(f"  aggregate: {run.steps['aggregate'].output.load()}")

    chunk_runs = await AsyncClient(stack).list_pipeline_runs(pipeline_name="chunk_pipeline",
                                                             limit=100)
    print(f"\n3) every chunk is a run of its own in the store: {len(chunk_runs)} chunk_pipeline runs")


def main() -> None:
    flowcore.enable_console_logging(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        # A durable local stack in a temporary directory: the chunk runs are stored like any
        # other run and read back by the fan-in step; nothing is left behind.
        stack = Stack.local(tmp)
        flowcore.set_active_stack(stack)
        asyncio.run(app(stack))


if __name__ == "__main__":
    main()
