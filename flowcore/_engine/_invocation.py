"""One invocation of a step: cache lookup, attempts (retry, timeout, operator), outputs, hooks.

`Invoker.invoke` returns an outcome value; it raises only the run's own cancellation. What
the scheduler decides (may a body start now? what happens once a step has failed?) it asks
through the `Gate` it is given, so the failure is known to the scheduler before any hook runs.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from flowcore import _capture
from flowcore._cache import lookup_cache
from flowcore._engine._isolation import isolated
from flowcore._engine._lifecycle import Lifecycle
from flowcore._engine._outputs import check_inputs, output_value, split_outputs, store_outputs
from flowcore._engine._plan import NodePlan, RunPlan
from flowcore._engine._shield import finish_regardless
from flowcore._graph import Node
from flowcore._hooks import BoundHook
from flowcore._models import ArtifactVersion, StepRun
from flowcore._retry import retry_delay, should_retry
from flowcore.context import StepContext, reset_step_context, set_step_context
from flowcore.exceptions import StepInputError, StepTimeoutError
from flowcore.stack._remote_data import (
    RemoteArtifactStore,
    StoredOutputs,
    StoredValue,
    moves_own_data,
    worker_body,
)
from flowcore.stores._base import MetadataStore

__all__ = ["Gate", "Invoker", "Outcome", "loaded_values", "run_cancelled"]


class Outcome:
    """How an invocation ended: `values`/`artifacts` on success, `error` on failure; `ok` is
    False for a failed or stopped invocation."""

    __slots__ = ("artifacts", "error", "ok", "values")

    def __init__(self, ok: bool, values: dict[str, Any] | None = None,
                 artifacts: dict[str, ArtifactVersion] | None = None,
                 error: BaseException | None = None) -> None:
        self.ok = ok
        self.values = values
        self.artifacts = artifacts
        self.error = error


STOPPED = Outcome(False)


class Gate(Protocol):
    """What an invocation asks the scheduler."""

    def may_start(self) -> bool:
        """Whether a step body may start now (False once a stopping run has a failure)."""

    def failed(self, error: BaseException) -> bool:
        """A step's last attempt failed; True if its failure hooks run now, False if the
        scheduler has deferred them (FAIL_FAST runs them after the other steps stopped)."""

    def defer(self, hooks: Callable[[], Awaitable[None]]) -> None:
        """Run `hooks` once the run's steps have stopped."""

    @property
    def slots(self) -> asyncio.Semaphore | None:
        """`max_concurrency` slots a body holds while it runs, or None for no limit."""


def run_cancelled() -> bool:
    """Whether the current task is being cancelled (as opposed to a body raising
    CancelledError on its own)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _set_done(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _signal_when_returned(func: Callable[..., Any], done: asyncio.Future[None],
                          loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """Wrap a sync body so the loop learns when its thread returns (a timed-out body runs on;
    the next attempt must not start before it ends)."""

    @functools.wraps(func)
    def body(**kwargs: Any) -> Any:
        try:
            return func(**kwargs)
        finally:
            try:
                loop.call_soon_threadsafe(_set_done, done)
            except RuntimeError:  # the loop has closed: nobody waits any more
                pass

    return body


class Invoker:
    """Runs invocations of one run's steps."""

    def __init__(self, plan: RunPlan, lifecycle: Lifecycle, store: MetadataStore,
                 gate: Gate) -> None:
        self.plan = plan
        self.lifecycle = lifecycle
        self.store = store
        self.artifact_store = plan.stack.artifact_store
        self.gate = gate
        self.clock = plan.clock
        self.tracker_locks: dict[int, asyncio.Lock] = {}
        # Awaited before a step's dependents start, so they can read its row through a
        # client; not needed by a store that never queues (memory) nor by one whose reads
        # wait for this process's queued writes, committed in order (SQLite).
        self.flush: Callable[[], Awaitable[None]] | None = (
            None if type(store).flush is MetadataStore.flush
            or getattr(store, "reads_own_writes", False) else store.flush)
        self.where = f"pipeline '{plan.graph.pipeline_name}'"

    def moves_data(self, node: Node, node_plan: NodePlan) -> bool:
        """Whether the node's body runs where it loads its inputs and stores its outputs
        itself (a Dask worker with an artifact store every machine reaches)."""
        # A mapped node's elements come back to the driver to be gathered into one list.
        return (node_plan.operator is not None and node.map_spec is None
                and moves_own_data(node_plan.operator, self.artifact_store))

    # -- cache -----------------------------------------------------------------------------

    async def lookup(self, node: Node, sr: StepRun, node_plan: NodePlan,
                     input_hashes: dict[str, Any], element: Any = None,
                     ) -> dict[str, ArtifactVersion] | None:
        """Look the invocation up in the cache; on a hit mark it CACHED and return its outputs."""
        life = self.lifecycle
        found = await lookup_cache(self.store, node, sr, input_hashes, node_plan.materializers,
                                   element)
        sr.cache_key = found.key
        hit = found.hit
        if hit is None:
            assert found.reason is not None
            life.cache_missed(sr, found.reason, uncacheable=found.uncacheable)
            return None
        for artifact in hit.outputs.values():
            damage = await self.artifact_store.verify(artifact)
            if damage is not None:
                life.cache_missed(sr, f"cached artifact could not be loaded: {damage}")
                return None
        if not life.step_cached(sr, dict(hit.outputs), hit.pipeline_run_id):
            return None
        if self.flush is not None:  # see __init__
            await self.flush()
        return sr.outputs

    # -- attempts --------------------------------------------------------------------------

    async def invoke(self, node: Node, sr: StepRun, node_plan: NodePlan,
                     kwargs: dict[str, Any]) -> Outcome:
        """Run the attempts of one invocation whose inputs are resolved."""
        step = node.step
        sig = step.signature
        life = self.lifecycle
        cfg = node.config
        policy = cfg.retry
        pool = cfg.pool
        hooks = node_plan.hooks
        direct = node_plan.direct
        ctx = StepContext(sr, life.run, self.plan.pipeline_info, self.plan.stack, 1,
                          sig.output_names)
        token = set_step_context(ctx)
        capture = None
        capture_token = None
        if self.plan.capture_logs:
            limit = cfg.log_limit
            capture = _capture.CaptureBuffer(_capture.DEFAULT_LOG_LIMIT if limit is None else limit)
            capture_token = _capture.set_buffer(capture)
        previous_body: asyncio.Future[None] | None = None
        attempt = 0
        try:
            while True:
                attempt += 1
                if previous_body is not None:
                    # A sync body that timed out still runs in its thread: never two at once.
                    await previous_body
                    previous_body = None
                if attempt > 1 and not self.gate.may_start():
                    life.step_stopped(sr, _joined(capture))
                    return STOPPED
                if pool is not None:
                    # A slot is held only while the body runs: not in retry waits, nor while
                    # upstream steps run, so pools never deadlock (API.md §16).
                    waited_from = self.clock.monotonic()
                    await self.plan.stack.pools.acquire(pool, sr.id, self.store)
                    sr.waited += self.clock.monotonic() - waited_from
                    if not self.gate.may_start():
                        await self._release_slot(pool, sr.id)
                        life.step_stopped(sr, _joined(capture))
                        return STOPPED
                ctx.attempt = attempt
                if not life.step_running(sr, attempt):
                    if pool is not None:
                        await self._release_slot(pool, sr.id)
                    return STOPPED
                if hooks and "on_start" in hooks:
                    await self._call_hook(sr, hooks["on_start"])
                # Timed only for the log line that reports it.
                started = self.clock.monotonic() if life.log_on else 0.0
                try:
                    remote = not direct and self.moves_data(node, node_plan)
                    if attempt == 1 and sig.checked_inputs and not remote:
                        check_inputs(self.where, node, kwargs)
                    try:
                        if direct:
                            result = await step.func(**kwargs)
                        else:
                            done = None
                            if cfg.timeout is not None and not sig.is_async and (
                                node_plan.operator is None
                            ):
                                done = asyncio.get_running_loop().create_future()
                            try:
                                result = await self._call_body(node, node_plan, kwargs, attempt,
                                                               done, sr if remote else None)
                            finally:
                                if done is not None and not done.done():
                                    previous_body = done
                    finally:
                        if pool is not None:
                            await self._release_slot(pool, sr.id, previous_body)
                    if type(result) is StoredOutputs:
                        # Split, checked and stored by the worker: only references came back.
                        artifacts = {n: self.artifact_store.bind(a)
                                     for n, a in result.artifacts.items()}
                        values = {n: StoredValue(a) for n, a in artifacts.items()}
                    else:
                        values = split_outputs(self.where, node, result)
                        artifacts = await store_outputs(
                            self.where, node, sr, node_plan, self.artifact_store, values
                        ) if values else {}
                except BaseException as exc:
                    if isinstance(exc, asyncio.CancelledError) and run_cancelled():
                        raise
                    if not isinstance(exc, StepInputError) and should_retry(policy, attempt, exc):
                        assert policy is not None
                        delay = retry_delay(policy, attempt)
                        life.step_retrying(sr, attempt, exc, delay)
                        # Retries are rare and waits long: make RETRYING durable before the
                        # wait starts (another process's client sees it at once).
                        await self.store.flush()
                        if delay > 0:
                            await self.clock.sleep(delay)
                        continue
                    await self.fail(node, sr, node_plan, exc, _joined(capture))
                    return Outcome(False, error=exc)
                if not life.step_completed(sr, artifacts, _joined(capture),
                                           self.clock.monotonic() - started if life.log_on
                                           else None):
                    return STOPPED
                if self.flush is not None:  # see __init__
                    await self.flush()
                if hooks and ("on_success" in hooks or "on_end" in hooks):
                    # The hooks' own copy: a hook changing it changes no consumer's input.
                    out = await isolated(output_value(node, values)) if not remote else (
                        output_value(node, await loaded_values(values)))
                    if "on_success" in hooks:
                        await self._call_hook(sr, hooks["on_success"], step_output=out)
                    if "on_end" in hooks:
                        await self._call_hook(sr, hooks["on_end"], step_output=out)
                return Outcome(True, values, artifacts)
        except asyncio.CancelledError:
            life.step_stopped(sr, _joined(capture))
            raise
        finally:
            if capture_token is not None:
                _capture.reset_buffer(capture_token)
            reset_step_context(token)

    async def _release_slot(self, pool: str, holder: str,
                            body: asyncio.Future[None] | None = None) -> None:
        pools = self.plan.stack.pools
        if body is not None and not body.done():
            # A timed-out sync body still runs in its thread: it keeps the slot until it
            # returns, while the step is already RETRYING or FAILED.
            pools.release_when_done(pool, holder, body)
            return
        await finish_regardless(pools.release(pool, holder, self.store))

    async def fail(self, node: Node, sr: StepRun, node_plan: NodePlan, exc: BaseException,
                   logs: str | None = None) -> None:
        """Record the step FAILED, tell the scheduler, then run (or defer) its failure hooks."""
        if not self.lifecycle.step_failed(sr, exc, logs):
            return
        hooks = node_plan.hooks
        if "on_failure" not in hooks and "on_end" not in hooks:
            self.gate.failed(exc)
            return

        async def failure_hooks() -> None:
            if "on_failure" in hooks:
                await self._call_hook(sr, hooks["on_failure"], exception=exc)
            if "on_end" in hooks:
                await self._call_hook(sr, hooks["on_end"], exception=exc)

        if self.gate.failed(exc):
            await failure_hooks()
        else:
            self.gate.defer(failure_hooks)

    async def _call_hook(self, sr: StepRun, hook: BoundHook, *,
                         exception: BaseException | None = None, step_output: Any = None) -> None:
        try:
            await hook.call(exception=exception, step_name=sr.name, step_output=step_output,
                            status=sr.status)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and run_cancelled():
                raise
            self.lifecycle.hook_failed(sr, hook, exc)

    async def _call_body(self, node: Node, node_plan: NodePlan, kwargs: dict[str, Any],
                         attempt: int, done: asyncio.Future[None] | None,
                         remote_run: StepRun | None = None) -> Any:
        step = node.step
        operator = node_plan.operator or self.plan.stack.local_operator
        func = step.func
        tracker = node_plan.tracker
        if tracker is not None:
            # The tracker's context is entered where the body runs (a worker thread for a
            # sync body), since trackers such as MLflow keep their active run per thread.
            lock = None
            if step.is_async and getattr(tracker, "thread_bound", False):
                lock = self.tracker_locks.setdefault(id(tracker), asyncio.Lock())
            func = _tracked(func, tracker, step.is_async, lock,
                            pipeline_name=self.plan.graph.pipeline_name,
                            run_name=self.lifecycle.run.name, step_name=node.id,
                            settings=node_plan.tracker_settings)
        if done is not None:
            func = _signal_when_returned(func, done, asyncio.get_running_loop())
        if remote_run is not None:
            func = worker_body(
                func, step.is_async, cast(RemoteArtifactStore, self.artifact_store),
                split=functools.partial(split_outputs, self.where, node),
                materializers=node_plan.materializers,
                check_inputs=functools.partial(check_inputs, self.where, node)
                if step.signature.checked_inputs else _no_check,
                producer_step_run_id=remote_run.id, label=f"{self.where}, step '{node.id}'",
            )
        coro = operator.run(func, kwargs, is_async=step.is_async,
                            settings=node_plan.operator_settings)
        timeout = node.config.timeout
        if timeout is None:
            return await coro
        try:
            async with asyncio.timeout(timeout) as scope:
                return await coro
        except TimeoutError:
            if scope.expired():
                raise StepTimeoutError(
                    f"{self.where}, step '{node.id}' timed out after {timeout} s "
                    f"(attempt {attempt})"
                ) from None
            raise


def _no_check(kwargs: dict[str, Any]) -> None:
    return None


async def loaded_values(values: dict[str, Any]) -> dict[str, Any]:
    """Outputs not in memory here (a worker stored them, or a cache hit), loaded."""
    return {name: await value.artifact.aload() if type(value) is StoredValue else value
            for name, value in values.items()}


def _joined(capture: _capture.CaptureBuffer | None) -> str | None:
    return capture.text() if capture is not None else None


def _tracked(func: Callable[..., Any], tracker: Any, is_async: bool,
             lock: asyncio.Lock | None = None, **track: Any) -> Any:
    if is_async:
        async def tracked_async(**kwargs: Any) -> Any:
            if lock is None:
                with tracker.track(**track):
                    return await func(**kwargs)
            # A tracker that keeps its active run per thread (MLflow) cannot have two async
            # bodies active on the loop's one thread: they take turns.
            async with lock:
                with tracker.track(**track):
                    return await func(**kwargs)
        return tracked_async

    def tracked(**kwargs: Any) -> Any:
        with tracker.track(**track):
            return func(**kwargs)
    return tracked

