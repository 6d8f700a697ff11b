"""Background runs inside an async application.

- `await p.run(...)` runs a pipeline on the caller's event loop and returns the `PipelineRun`.
- `p.submit(...)` starts a run in the background and returns a `RunHandle` at once; the app
  keeps doing its own work meanwhile. `await handle` returns the `PipelineRun`,
  `handle.status` / `handle.run_name` show where it is, and `await handle.cancel()` stops it
  (the run ends STOPPED).
- From synchronous code, `p.with_options(synchronous=False)(...)` returns a `RunHandle`
  whose `.result()` blocks (the run goes on in a thread of its own).
- Calling `p()` synchronously while an event loop is running is refused with an error that
  says to use `await p.run()`.

Run it with:  python examples/background_runs.py
"""

from __future__ import annotations

import asyncio
import logging

import flowcore
from flowcore import FlowcoreError, Stack, enable_console_logging, pipeline, step


@step(enable_cache=False)
async def download(seconds: float) -> int:
    await asyncio.sleep(seconds)  # an async step runs on the app's own event loop
    return 42


@step(enable_cache=False)
def summarize(n: int) -> str:  # a sync step runs in a worker thread: the loop never blocks
    return f"downloaded {n} records"


@pipeline
def ingest(seconds: float = 0.2) -> None:
    summarize(download(seconds))


async def app() -> None:
    print("1) await p.run(): run on this loop and wait for it")
    run = await ingest.run(seconds=0.05)
    print(f"  {run.name}: {run.status.value.upper()}, "
          f"{run.steps['summarize'].output.load()!r}")

    print("\n2) submit(): two background runs; the app keeps working")
    quick = ingest.submit(seconds=0.2)
    slow = ingest.submit(seconds=30)  # far too slow: we cancel it below
    for tick in range(3):
        await asyncio.sleep(0.05)
        print(f"  app tick {tick}: quick is {quick.status.value.upper()}, "
              f"slow is {slow.status.value.upper()}")

    done = await quick  # the same as `await quick.wait()`
    print(f"  awaited {quick.run_name}: {done.status.value.upper()}, "
          f"{done.steps['summarize'].output.load()!r}")

    stopped = await slow.cancel()
    print(f"  cancelled {slow.run_name}: {stopped.status.value.upper()}; steps "
          f"{ {n: s.status.value.upper() for n, s in stopped.steps.items()} }")

    print("\n3) a synchronous call on a running loop is refused")
    try:
        ingest()
    except FlowcoreError as exc:  # a RuntimeError, too
        print(f"  {type(exc).__name__}: {exc}")


def from_sync_code() -> None:
    print("\n4) from synchronous code: with_options(synchronous=False) returns a RunHandle")
    handle = ingest.with_options(synchronous=False)(seconds=0.1)
    print(f"  started {handle.run_name} ({handle.status.value.upper()}); doing other work...")
    run = handle.result(timeout=30)
    print(f"  result(): {run.status.value.upper()}")


def main() -> None:
    enable_console_logging(logging.WARNING)
    flowcore.set_active_stack(Stack.in_memory())
    asyncio.run(app())
    from_sync_code()


if __name__ == "__main__":
    main()
