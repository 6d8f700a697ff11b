"""Step operators: where a step body runs. The default runs async bodies on the loop and sync
bodies in a worker thread."""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from flowcore._batching import Coalescer
from flowcore._threads import run_in_worker_thread
from flowcore.exceptions import ConfigError, StepOperatorError
from flowcore.stack._process_worker import Worker

__all__ = [
    "DaskStepOperator",
    "LocalStepOperator",
    "ProcessStepOperator",
    "StepOperator",
    "StepOperatorError",
    "StepOperatorSettings",
]


class StepOperatorSettings(BaseModel):
    """Settings a step may pass to its step operator (`settings={"step_operator": {...}}`)."""

    model_config = ConfigDict(extra="forbid")


class StepOperator:
    """Base class: runs one attempt of a step body somewhere and returns its result."""

    flavor: ClassVar[str] = "local"
    SETTINGS: ClassVar[type[BaseModel]] = StepOperatorSettings
    # Whether its bodies run on other machines, so that with an artifact store every machine
    # reaches (s3://...) they load their inputs and store their outputs there themselves.
    moves_data: ClassVar[bool] = False

    async def start(self) -> None:
        """Acquire resources (pools, clusters) before the first step; safe to call twice."""

    async def stop(self) -> None:
        """Release resources."""

    async def run(
        self,
        func: Callable[..., Any],
        kwargs: dict[str, Any],
        *,
        is_async: bool,
        settings: BaseModel | None = None,
    ) -> Any:
        """Run one attempt; cancellation of the awaiting task must stop remote work too."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class LocalStepOperator(StepOperator):
    """Async bodies on the caller's loop; sync bodies in a worker thread that sees the step
    context."""

    async def run(
        self,
        func: Callable[..., Any],
        kwargs: dict[str, Any],
        *,
        is_async: bool,
        settings: BaseModel | None = None,
    ) -> Any:
        if is_async:
            return await func(**kwargs)
        return await run_in_worker_thread(func, **kwargs)


class ProcessStepOperator(StepOperator):
    """Runs step bodies in a pool of worker processes; body and inputs travel by cloudpickle.

    A worker that dies mid-step fails that step (retries can absorb it) and is replaced; a
    cancelled step's worker is killed, so cancellation stops the work now. Step context is not
    available inside the worker process.
    """

    flavor: ClassVar[str] = "process"

    def __init__(self, max_workers: int | None = None, start_method: str = "forkserver") -> None:
        import os

        if start_method not in multiprocessing.get_all_start_methods():
            raise ConfigError(f"ProcessStepOperator: unknown start_method {start_method!r}")
        self.max_workers = max_workers or os.cpu_count() or 2
        self.start_method = start_method
        self._idle: list[Worker] = []
        self._count = 0
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<ProcessStepOperator max_workers={self.max_workers}>"

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            self._slots = asyncio.Semaphore(self.max_workers)
            self._loop = loop
        return self._slots

    async def _take_worker(self) -> Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
            worker.kill()
        ctx = multiprocessing.get_context(self.start_method)
        return await asyncio.to_thread(Worker, ctx)

    async def run(
        self,
        func: Callable[..., Any],
        kwargs: dict[str, Any],
        *,
        is_async: bool,
        settings: BaseModel | None = None,
    ) -> Any:
        import cloudpickle

        try:
            body = cloudpickle.dumps((func, kwargs, is_async))
        except Exception as exc:
            raise StepOperatorError(
                f"cannot send step body or inputs to a worker process: {exc}") from exc
        payload = cloudpickle.dumps((list(sys.path), body))
        async with self._semaphore():
            worker = await self._take_worker()
            try:
                reply = await asyncio.to_thread(worker.roundtrip, payload)
            except asyncio.CancelledError:
                worker.kill()
                raise
            except (EOFError, OSError) as exc:
                # The pipe closed before the process was reaped: wait briefly for its code.
                await asyncio.to_thread(worker.process.join, 2)
                code = worker.process.exitcode
                worker.kill()
                raise StepOperatorError(
                    f"worker process {worker.process.pid} died while running the step "
                    f"(exit code {code})") from exc
            except BaseException:
                worker.kill()
                raise
            self._idle.append(worker)
        status, value = cloudpickle.loads(reply)
        if status == "err":
            raise value
        return value

    async def stop(self) -> None:
        idle, self._idle = self._idle, []
        for worker in idle:
            worker.conn.close()
            await asyncio.to_thread(worker.process.join, 5)
            if worker.process.is_alive():
                worker.kill()


class DaskStepOperatorSettings(StepOperatorSettings):
    """Per-step Dask settings: resources and retries handled by Dask itself."""

    resources: dict[str, float] | None = None
    priority: int = 0


# How often an async body on a Dask worker looks whether its task was cancelled.
_CANCEL_POLL_SECONDS = 0.05


def _dask_call(func: Callable[..., Any], kwargs: dict[str, Any], is_async: bool) -> Any:
    """The task flowcore submits to Dask: runs one attempt of a step body on a worker.

    A task the client cancelled before this thread reached it does not start the body; an
    async body is cancelled (`asyncio` cancellation, at its next `await`) once its task is.
    What such a task returns is never read: Dask drops the result of a cancelled task.
    """
    cancelled = _cancel_probe()
    if cancelled():
        return None
    if not is_async:
        # A sync body cannot be interrupted: once started it runs to its end.
        return func(**kwargs)
    return asyncio.run(_await_unless_cancelled(func(**kwargs), cancelled))


def _cancel_probe() -> Callable[[], bool]:
    """Whether the Dask task running in this thread has been cancelled by its client.

    Dask keeps a task the scheduler released while it executes in the worker's state as
    "cancelled" (and forgets it once it ends); that state is the flag, so cancelling needs no
    extra round trip. Outside a Dask worker it never reports a cancellation.
    """
    try:
        import distributed.utils
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return _never
    key = getattr(getattr(distributed.utils, "thread_state", None), "key", None)
    tasks = getattr(getattr(worker, "state", None), "tasks", None)
    if key is None or tasks is None:  # pragma: no cover - another distributed version
        return _never

    def cancelled() -> bool:
        # Read from the task's own thread while the worker's loop thread writes: one dict
        # lookup and one attribute read, each atomic.
        task = tasks.get(key)
        return task is None or task.state == "cancelled"

    return cancelled


def _never() -> bool:
    return False


async def _await_unless_cancelled(awaitable: Any, cancelled: Callable[[], bool]) -> Any:
    body: asyncio.Future[Any] = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({body}, timeout=_CANCEL_POLL_SECONDS)
        if done:
            return body.result()
        if cancelled():
            body.cancel()
            # Let the body run its `finally` blocks; its outcome is not wanted.
            await asyncio.wait({body})
            return None


class _ResultBatcher:
    """Fetches the results of finished Dask futures in batches.

    `await future` costs one scheduler round trip per step; here the results of the steps
    that finished while one fetch was in flight are gathered together by the next
    (`flowcore._batching.Coalescer`: no background task). Each step function is also sent
    to the workers once (scattered) instead of pickled into every task.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._fetch: Coalescer[Any, Any] = Coalescer(self._gather)
        # Step functions sent to every worker once (as Dask data), instead of pickled into
        # each task: id(func) -> (func, its Dask future), func kept alive so ids stay unique.
        self._functions: dict[int, tuple[Any, asyncio.Future[Any]]] = {}

    async def shipped(self, func: Callable[..., Any]) -> Any:
        """A Dask future holding `func` on the workers (scattered once per function)."""
        entry = self._functions.get(id(func))
        if entry is not None:
            return await entry[1]
        # The first step of this function scatters it; the others wait for that.
        ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._functions[id(func)] = (func, ready)
        try:
            scattered = await self._client.scatter(func, broadcast=True, hash=False)
        except BaseException as exc:
            # Cancelled, or not scatterable: this time the function travels with the task.
            del self._functions[id(func)]
            ready.set_result(func)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return func
        ready.set_result(scattered)
        return scattered

    async def result(self, future: Any) -> Any:
        state = getattr(future, "_state", None)
        if state is not None and hasattr(state, "wait"):
            # What Future.result() itself awaits: an event set when the task finishes (the
            # public distributed.wait() costs several times more per call).
            await state.wait()
        else:  # pragma: no cover - another distributed version
            import distributed

            await distributed.wait([future])  # type: ignore[no-untyped-call]
        if future.status != "finished":
            return await future  # the step's own error, or its cancellation
        # Only finished futures are gathered, so a batch never waits for a slow step.
        return await self._fetch(future)

    async def _gather(self, futures: list[Any]) -> list[Any]:
        try:
            return list(await self._client.gather(futures))
        except asyncio.CancelledError:
            raise
        except Exception:
            # Fetch them one by one, so each step gets its own outcome.
            outcomes: list[Any] = []
            for f in futures:
                try:
                    outcomes.append(await f)
                except Exception as exc:
                    outcomes.append(exc)
            return outcomes


class DaskStepOperator(StepOperator):
    """Runs step bodies on a Dask cluster through `distributed.Client(asynchronous=True)`.

    With no `address` it starts a `LocalCluster(n_workers, processes=processes)` on first use.
    Needs `pip install flowcore[dask]`.

    Cancelling a step (run stopped, FAIL_FAST, timeout) force-cancels its Dask future: a task
    still waiting for a worker thread never starts its body, and an async body that is running
    is cancelled at its next `await`. A sync body that is running cannot be interrupted: it
    runs to its end on the worker, holding that worker thread, and its result is dropped.
    """

    flavor: ClassVar[str] = "dask"
    SETTINGS: ClassVar[type[BaseModel]] = DaskStepOperatorSettings
    moves_data: ClassVar[bool] = True

    def __init__(
        self,
        address: str | None = None,
        n_workers: int | None = None,
        processes: bool = True,
        threads_per_worker: int = 1,
    ) -> None:
        self.address = address
        self.n_workers = n_workers
        self.processes = processes
        self.threads_per_worker = threads_per_worker
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}
        self._batchers: dict[asyncio.AbstractEventLoop, _ResultBatcher] = {}
        self._clusters: dict[asyncio.AbstractEventLoop, Any] = {}
        self._lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"<DaskStepOperator {self.address or 'LocalCluster'}>"

    async def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is not None:
            return client
        if self._lock is None or getattr(self._lock, "_flowcore_loop", None) is not loop:
            self._lock = asyncio.Lock()
            self._lock._flowcore_loop = loop  # type: ignore[attr-defined]
        async with self._lock:
            client = self._clients.get(loop)
            if client is not None:
                return client
            try:
                import distributed
            except ImportError as exc:
                raise ConfigError(
                    "DaskStepOperator needs dask.distributed: pip install 'flowcore[dask]'"
                ) from exc
            if self.address is None:
                cluster = await distributed.LocalCluster(  # type: ignore[no-untyped-call]
                    n_workers=self.n_workers,
                    processes=self.processes,
                    threads_per_worker=self.threads_per_worker,
                    asynchronous=True,
                    dashboard_address=None,
                )
                self._clusters[loop] = cluster
                client = await distributed.Client(  # type: ignore[no-untyped-call]
                    cluster, asynchronous=True)
            else:
                client = await distributed.Client(  # type: ignore[no-untyped-call]
                    self.address, asynchronous=True)
            self._clients[loop] = client
            self._batchers[loop] = _ResultBatcher(client)
            return client

    async def start(self) -> None:
        await self._client()

    async def run(
        self,
        func: Callable[..., Any],
        kwargs: dict[str, Any],
        *,
        is_async: bool,
        settings: BaseModel | None = None,
    ) -> Any:
        client = await self._client()
        options: dict[str, Any] = {"pure": False}
        if isinstance(settings, DaskStepOperatorSettings):
            if settings.resources:
                options["resources"] = settings.resources
            options["priority"] = settings.priority
        batcher = self._batchers.get(asyncio.get_running_loop())
        shipped = await batcher.shipped(func) if batcher is not None else func
        future = client.submit(_dask_call, shipped, kwargs, is_async, **options)
        try:
            if batcher is None:
                return await future
            return await batcher.result(future)
        except asyncio.CancelledError:
            # force: the task is ours alone (pure=False), so no other client can want it.
            await asyncio.shield(client.cancel(future, force=True))
            raise

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        self._batchers.pop(loop, None)
        if client is not None:
            await client.close()
        cluster = self._clusters.pop(loop, None)
        if cluster is not None:
            await cluster.close()
