"""flowcore inside a web service: a Starlette app served by uvicorn.

One Stack serves the whole app: opened in the lifespan (which marks the runs of dead
processes CRASHED) and closed on shutdown (runs still live end STOPPED, recorded).
  POST /runs {"n": 3, "wait": false, "sleep": 0.2}   a run, awaited (200) or in the background (202)
  GET  /runs/{name}             the stored run         GET /runs/{name}/events   its events, as SSE
  POST /runs/{name}/cancel {"drain": false}          POST /runs/{name}/resume {"sleep": 0}

Run it with:  pip install -e ".[service]" && python examples/service.py --port 8765 --home DIR
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flowcore import (
    AsyncClient,
    PipelineRun,
    RunFailedError,
    RunHandle,
    RunNotFoundError,
    RunStateError,
    Stack,
    events,
    pipeline,
    step,
)


@step
async def numbers(n: int) -> list[int]:
    return list(range(n))


@step
async def square(x: int) -> int:
    return x * x


@step
def total(values: list[int]) -> int:  # a sync step: flowcore runs it off the event loop
    return sum(values)


@step
async def publish(value: int, sleep: float) -> str:
    await asyncio.sleep(sleep)  # stands in for slow work: an upload, a report, ...
    return f"total={value}"


# Caching off so that every request really runs; a resumed run still reuses what finished.
@pipeline(enable_cache=False)
def demo(n: int = 3, sleep: float = 0.2) -> None:
    publish(total(square.map(numbers(n))), sleep=sleep)  # fan-out over n, then fan-in


def run_json(run: PipelineRun) -> dict[str, Any]:
    return {"name": run.name, "id": run.id, "status": run.status.value, "resumed_from": run.resumed_from,
            "steps": {name: s.status.value for name, s in run.steps.items()}}


async def stored_events(run: PipelineRun) -> AsyncIterator[events.Event]:
    """For a run this process holds no handle of (another process's, or from before a
    restart): what its stored record says, once."""
    yield events.RunStarted(run.id, run.name, run.pipeline_name, tuple(run.steps), run.start_time)
    for s in sorted(run.steps.values(), key=lambda s: s.end_time or run.start_time):
        if s.status.is_finished and s.end_time:
            yield events.StepFinished(run.id, s.name, s.status.value, s.attempts, None, s.end_time)
    if run.status.is_finished:
        yield events.RunFinished(run.id, run.name, run.status.value, run.end_time or run.start_time)


async def body(request: Request) -> dict[str, Any]:
    return await request.json() if await request.body() else {}


async def start_run(request: Request) -> Response:
    args = await body(request)
    params = {"n": int(args.get("n", 3)), "sleep": float(args.get("sleep", 0.2))}
    if not args.get("wait"):
        return submitted(request, request.state.pipeline.submit(**params))
    try:
        run = await request.state.pipeline.run(**params)
    except RunFailedError as exc:  # a failed run is still an answer, not a server error
        run = exc.run
    return JSONResponse(run_json(run))


def submitted(request: Request, handle: RunHandle) -> Response:
    # Handles are kept only to stream live events (the store has everything else), and those
    # of finished runs are dropped here: no reaper task needed.
    handles: dict[str, RunHandle] = request.state.handles
    for name in [name for name, h in handles.items() if h.done()]:
        del handles[name]
    handles[handle.run_name] = handle
    return JSONResponse({"name": handle.run_name, "status": handle.status.value}, status_code=202)


async def get_run(request: Request) -> Response:
    return JSONResponse(run_json(await request.state.client.get_pipeline_run(request.path_params["name"])))


async def run_events(request: Request) -> Response:
    name = request.path_params["name"]
    handle = request.state.handles.get(name)
    # The stored run is read before the response starts, so an unknown name is a 404.
    source = handle.events() if handle else stored_events(await request.state.client.get_pipeline_run(name))

    async def stream() -> AsyncIterator[str]:
        async for event in source:
            record = {"type": type(event).__name__, **dataclasses.asdict(event)}
            yield f"data: {json.dumps(record, default=str)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def cancel_run(request: Request) -> Response:
    # Through the store: it stops a run of any process sharing it, not only of this one.
    name, drain = request.path_params["name"], bool((await body(request)).get("drain", False))
    await request.state.client.cancel_run(name, drain=drain)
    return JSONResponse(run_json(await request.state.client.get_pipeline_run(name)))


async def resume_run(request: Request) -> Response:
    # A new run: what finished in the named one is reused (CACHED), the rest runs; parameters
    # not given are the original's. A run still live in some process is a 409.
    args = await body(request)
    p = request.state.pipeline.with_options(resume_from=request.path_params["name"])
    return submitted(request, p.submit(**{k: args[k] for k in ("n", "sleep") if k in args}))


def error(status: int) -> Any:
    async def handler(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status)
    return handler


def create_app(home: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with Stack.local(home) as stack:
            # Starlette hands this state to every request as request.state.*
            yield {"pipeline": demo.with_options(stack=stack), "client": AsyncClient(stack), "handles": {}}

    return Starlette(
        routes=[Route("/runs", start_run, methods=["POST"]),
                Route("/runs/{name}", get_run),
                Route("/runs/{name}/events", run_events),
                Route("/runs/{name}/cancel", cancel_run, methods=["POST"]),
                Route("/runs/{name}/resume", resume_run, methods=["POST"])],
        exception_handlers={RunNotFoundError: error(404), RunStateError: error(409), ValueError: error(400)},
        lifespan=lifespan,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="flowcore inside a Starlette service")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--home", default=".flowcore", help="where runs and artifacts are stored")
    cli = parser.parse_args()
    # Requests still open at shutdown (a waited run, an event stream) get 3 s; then they are
    # cancelled, and the lifespan's close stops the background runs.
    uvicorn.run(create_app(cli.home), host="127.0.0.1", port=cli.port, timeout_graceful_shutdown=3)
