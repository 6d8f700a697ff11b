"""Query runs and artifacts: `AsyncClient` on an event loop, `Client` from synchronous code."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from flowcore._models import ArtifactVersion, PipelineRun, RunStatus
from flowcore.stack import Stack, get_active_stack

__all__ = ["AsyncClient", "Client"]

T = TypeVar("T")

# Across processes there is no event to wait on: cancel_run re-reads the run this often, for
# at most this long (the owner notices a request within about a second, API.md §15).
_CANCEL_POLL = 0.2
_CANCEL_WAIT = 15.0


def _current_stack() -> Stack:
    # Inside a step body or hook, the stack of the run itself (which may have been given with
    # with_options(stack=...)); elsewhere the active stack.
    from flowcore.context import _current

    ctx = _current.get()
    return ctx.stack if ctx is not None else get_active_stack()


class AsyncClient:
    """Reads runs and artifacts from a stack's metadata store (by default the active stack, or
    inside a step the stack its run uses)."""

    def __init__(self, stack: Stack | None = None) -> None:
        self._stack = stack

    @property
    def active_stack(self) -> Stack:
        return self._stack or _current_stack()

    async def get_pipeline_run(self, name_or_id: str) -> PipelineRun:
        """A run by name or id (raises RunNotFoundError)."""
        store = await self.active_stack.metadata_store()
        return await store.get_run(name_or_id)

    async def list_pipeline_runs(
        self,
        pipeline_name: str | None = None,
        status: RunStatus | str | None = None,
        limit: int = 50,
    ) -> list[PipelineRun]:
        """Listed runs, newest first, optionally of one pipeline or status."""
        store = await self.active_stack.metadata_store()
        return await store.list_runs(pipeline_name=pipeline_name, status=status, limit=limit)

    async def get_artifact_version(self, artifact_id: str) -> ArtifactVersion:
        """One artifact version by id (raises ArtifactLoadError if unknown)."""
        store = await self.active_stack.metadata_store()
        return await store.get_artifact(artifact_id)

    async def get_step_logs(self, run_name_or_id: str, step_name: str) -> str:
        """What one step of a run printed and logged."""
        run = await self.get_pipeline_run(run_name_or_id)
        try:
            step_run = run.steps[step_name]
        except KeyError:
            from flowcore.exceptions import FlowcoreError

            raise FlowcoreError(
                f"run '{run.name}' has no step '{step_name}' (steps: {', '.join(run.steps)})"
            ) from None
        if step_run.logs is not None:
            return step_run.logs
        store = await self.active_stack.metadata_store()
        return await store.get_step_logs(step_run.id)

    async def delete_pipeline_run(self, name_or_id: str) -> None:
        """Delete a run and its step runs."""
        store = await self.active_stack.metadata_store()
        await store.delete_run(name_or_id)

    async def clear_cache(self, pipeline_name: str | None = None) -> int:
        """Forget cache entries (of one pipeline, or all); returns how many."""
        store = await self.active_stack.metadata_store()
        return await store.clear_cache(pipeline_name)

    async def cancel_run(self, name_or_id: str, drain: bool = False) -> RunStatus:
        """Stop a run, from this or any process sharing the store; return its final status.

        Without `drain` the run's running steps are stopped (like FAIL_FAST); with `drain`
        they finish and nothing new starts (like STOP_ON_FAILURE); the run ends STOPPED. A run
        whose process is gone is marked CRASHED at once. A finished run is left as it is.
        Waits (up to about 15 s for a run in another process) until the run is finished.

        Raises:
            RunNotFoundError: no such run.
        """
        stack = self.active_stack
        store = await stack.metadata_store()
        run = await store.get_run(name_or_id)
        if run.status.is_finished:
            return run.status
        live = stack.live_runs.get(run.id)
        if live is not None:
            # Run by this process: stop it directly and wait until its record is final.
            live.request_stop(drain)
            await stack.live_runs.finished(live)
            return (await store.get_run(run.id)).status
        status = await store.request_cancel(run.id, drain)
        deadline = time.monotonic() + _CANCEL_WAIT
        while status is RunStatus.RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(_CANCEL_POLL)
            status = (await store.get_run(run.id)).status
        return status


class Client:
    """The synchronous twin of `AsyncClient`, with the same methods."""

    def __init__(self, stack: Stack | None = None) -> None:
        self._stack = stack

    @property
    def active_stack(self) -> Stack:
        return self._stack or _current_stack()

    def _call(self, method: Callable[[AsyncClient], Awaitable[T]]) -> T:
        stack = self.active_stack

        async def main() -> T:
            try:
                return await method(AsyncClient(stack))
            finally:
                await stack.close()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(main())
        # Called from a thread whose loop is running (an async step body, say): a fresh loop
        # on a worker thread serves the call. Prefer AsyncClient there.
        with concurrent.futures.ThreadPoolExecutor(1, "flowcore-client") as pool:
            return pool.submit(asyncio.run, main()).result()

    def get_pipeline_run(self, name_or_id: str) -> PipelineRun:
        """A run by name or id (raises RunNotFoundError)."""
        return self._call(lambda c: c.get_pipeline_run(name_or_id))

    def list_pipeline_runs(
        self,
        pipeline_name: str | None = None,
        status: RunStatus | str | None = None,
        limit: int = 50,
    ) -> list[PipelineRun]:
        """Listed runs, newest first, optionally of one pipeline or status."""
        return self._call(lambda c: c.list_pipeline_runs(pipeline_name, status, limit))

    def get_artifact_version(self, artifact_id: str) -> ArtifactVersion:
        """One artifact version by id (raises ArtifactLoadError if unknown)."""
        return self._call(lambda c: c.get_artifact_version(artifact_id))

    def get_step_logs(self, run_name_or_id: str, step_name: str) -> str:
        """What one step of a run printed and logged."""
        return self._call(lambda c: c.get_step_logs(run_name_or_id, step_name))

    def delete_pipeline_run(self, name_or_id: str) -> None:
        """Delete a run and its step runs."""
        self._call(lambda c: c.delete_pipeline_run(name_or_id))

    def clear_cache(self, pipeline_name: str | None = None) -> int:
        """Forget cache entries (of one pipeline, or all); returns how many."""
        return self._call(lambda c: c.clear_cache(pipeline_name))

    def cancel_run(self, name_or_id: str, drain: bool = False) -> RunStatus:
        """Stop a run from this or any process sharing the store; its final status (see
        `AsyncClient.cancel_run`)."""
        return self._call(lambda c: c.cancel_run(name_or_id, drain))


