"""The scheduler: the one place that creates a run's tasks.

One `asyncio.TaskGroup` per run. A step task is created the moment its last dependency ends
(the finishing task launches its ready children itself: no polling, no batches). Inside the
runner a step's result or error is a value; exceptions reach users only at the boundary.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from flowcore import _capture
from flowcore import _events as events
from flowcore import _logging as flog
from flowcore._cache import CacheKeyError, compute_cache_key
from flowcore._compile import ResolvedStepConfig
from flowcore._graph import Node, OutputRef
from flowcore._hooks import BoundHook
from flowcore._models import (
    ArtifactVersion,
    ErrorInfo,
    HookError,
    PipelineRun,
    RunStatus,
    StepRun,
    StepRunConfig,
    StepStatus,
)
from flowcore._prepare import NodePlan, PreparedRun, utcnow
from flowcore._retry import retry_delay, should_retry
from flowcore.config import ExecutionMode
from flowcore.context import StepContext, reset_step_context, set_step_context
from flowcore.exceptions import (
    MaterializerError,
    RunFailedError,
    StepInputError,
    StepOutputError,
    StepTimeoutError,
)
from flowcore.stores._base import MetadataStore

__all__ = ["error_info", "execute", "execute_in_background", "mark_unstarted_stopped"]

_INFO = logging.INFO
_utcnow = utcnow


class _Lazy:
    """An output not in memory (a cache hit): loaded from its artifact when first needed."""

    __slots__ = ("artifact",)

    def __init__(self, artifact: ArtifactVersion) -> None:
        self.artifact = artifact



def _emit(event: events.Event) -> None:
    for listener in list(events.listeners):
        try:
            listener(event)
        except Exception:  # a display must never break a run
            flog.stdlib_logger.debug("event listener failed", exc_info=True)


def _step_finished(run: PipelineRun, sr: StepRun) -> None:
    _emit(events.StepFinished(run.id, sr.name, sr.status.value, sr.attempts,
                              str(sr.error) if sr.error else None, sr.end_time or _utcnow()))


def error_info(exc: BaseException) -> ErrorInfo:
    """The type, message and traceback text of an exception."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ErrorInfo(type=type(exc).__name__, message=str(exc), traceback=tb)


class _Scheduler:
    """Drives one run of a graph; created and used by `execute` only."""

    def __init__(self, prep: PreparedRun, store: MetadataStore) -> None:
        graph = prep.graph
        self.prep = prep
        self.graph = graph
        self.nodes = graph.nodes
        self.plans = prep.plans
        self.store = store
        self.record = store.record_step_run
        self.artifact_store = prep.stack.artifact_store
        self.run = prep.run
        self.step_runs: list[StepRun] = [prep.run.steps[n.id] for n in graph.nodes]
        self.ready = graph.ready_set()
        self.values: list[dict[str, Any] | None] = [None] * len(graph.nodes)
        self.artifacts: list[dict[str, ArtifactVersion] | None] = [None] * len(graph.nodes)
        self.consumers_left = list(graph.data_consumers)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.started: set[int] = set()
        self.index = {n.id: n.index for n in graph.nodes}
        self.tracker_locks: dict[int, asyncio.Lock] = {}
        self.mode = prep.mode
        self.stopping = False
        self.first_error: BaseException | None = None
        self.sem = (
            asyncio.Semaphore(prep.max_concurrency) if prep.max_concurrency is not None else None
        )
        self.clock = prep.clock
        self.tg: asyncio.TaskGroup | None = None
        self.all_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.log_on = flog.enabled(_INFO)
        self.where = f"pipeline '{graph.pipeline_name}'"

    # -- scheduling ------------------------------------------------------------------------

    async def drive(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self.tg = tg
            writer = tg.create_task(self.store.serve_writes(),
                                    name=f"flowcore:writer:{self.run.name}")
            try:
                first = self.ready.get_ready()
                if first:
                    self._launch(first)
                    await self.all_done
            finally:
                writer.cancel()
        self._skip_pending()

    def _launch(self, indices: list[int]) -> None:
        tg = self.tg
        assert tg is not None
        nodes = self.nodes
        tasks = self.tasks
        for i in indices:
            tasks[i] = tg.create_task(self._step_task(i), name=f"flowcore:{nodes[i].id}")

    async def _step_task(self, i: int) -> None:
        if self.stopping:
            # Launched together with a step that failed before this task got its first turn:
            # no new step starts once the run is stopping (STOP_ON_FAILURE and FAIL_FAST alike).
            self._mark_skipped([i])
            self.tasks.pop(i, None)
            if not self.tasks and not self.all_done.done():
                self.all_done.set_result(None)
            return
        self.started.add(i)
        try:
            ok = await self._execute(i)
        except asyncio.CancelledError:
            sr = self.step_runs[i]
            if not sr.status.is_finished:
                sr.status = StepStatus.STOPPED
                sr.end_time = _utcnow()
                if self.log_on:
                    flog.log(_INFO, "step_stopped", run=self.run.name, step=sr.name)
                if events.listeners:
                    _step_finished(self.run, sr)
            self._finish(i, ok=False, stopped=True)
            raise
        except BaseException as exc:  # a bug in flowcore itself: record, never hang the run
            sr = self.step_runs[i]
            sr.status = StepStatus.FAILED
            sr.error = error_info(exc)
            sr.end_time = _utcnow()
            if self.first_error is None:
                self.first_error = exc
            self._finish(i, ok=False)
            return
        self._finish(i, ok=ok)

    def _finish(self, i: int, *, ok: bool, stopped: bool = False) -> None:
        self.tasks.pop(i, None)
        self.started.discard(i)
        # Release upstream values nobody downstream needs any more.
        left = self.consumers_left
        for p in self.nodes[i].data_parents:
            left[p] -= 1
            if left[p] == 0:
                self.values[p] = None
        if ok:
            newly = self.ready.done(i)
            if newly:
                if self.stopping:
                    self._mark_skipped(newly)
                else:
                    self._launch(newly)
        else:
            self._mark_skipped(self.ready.failed(i))
            if not stopped and self.mode is not ExecutionMode.CONTINUE_ON_FAILURE:
                self._stop_new_work()
        if not self.tasks and not self.all_done.done():
            self.all_done.set_result(None)

    def _stop_new_work(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._mark_skipped(self.ready.skip_rest())
        if self.mode is ExecutionMode.FAIL_FAST:
            for j, task in list(self.tasks.items()):
                task.cancel()
                if j not in self.started:
                    # A task cancelled before its first step never runs its body (nor its
                    # bookkeeping): the step never began, so it is skipped here.
                    self.tasks.pop(j)
                    self._mark_skipped([j])

    def _mark_skipped(self, indices: list[int]) -> None:
        now = None
        for j in indices:
            sr = self.step_runs[j]
            if sr.status is StepStatus.PENDING:
                if now is None:
                    now = _utcnow()
                sr.status = StepStatus.SKIPPED
                sr.end_time = now
                if self.log_on:
                    flog.log(_INFO, "step_skipped", run=self.run.name, step=sr.name)
                if events.listeners:
                    _step_finished(self.run, sr)

    def _skip_pending(self) -> None:
        self._mark_skipped([i for i, sr in enumerate(self.step_runs)
                            if sr.status is StepStatus.PENDING])

    # -- one invocation --------------------------------------------------------------------

    async def _resolve(self, ref: OutputRef) -> Any:
        idx = self.index[ref.node_id]
        values = self.values[idx]
        if values is None:
            arts = self.artifacts[idx]
            assert arts is not None, f"output of {ref.node_id} is gone"
            return await arts[ref.output].aload()
        value = values[ref.output]
        if type(value) is _Lazy:
            value = await value.artifact.aload()
            values[ref.output] = value
        return value

    async def _resolve_nested(self, template: Any) -> Any:
        if isinstance(template, OutputRef):
            return await self._resolve(template)
        if isinstance(template, list):
            return [await self._resolve_nested(v) for v in template]
        if isinstance(template, tuple):
            return tuple([await self._resolve_nested(v) for v in template])
        if isinstance(template, dict):
            return {k: await self._resolve_nested(v) for k, v in template.items()}
        return template

    async def _inputs(self, node: Node) -> dict[str, Any]:
        kwargs = dict(node.constants)
        values = self.values
        index = self.index
        for key, ref in node.direct_refs:
            # The common case without an await: the upstream value is in memory.
            held = values[index[ref.node_id]]
            value = held.get(ref.output, _Lazy) if held is not None else _Lazy
            if value is _Lazy or type(value) is _Lazy:
                value = await self._resolve(ref)
            kwargs[key] = value
        for key, template in node.nested_refs:
            kwargs[key] = await self._resolve_nested(template)
        return kwargs

    def _input_hashes(self, node: Node) -> dict[str, Any]:
        def h(value: Any) -> Any:
            if isinstance(value, OutputRef):
                arts = self.artifacts[self.graph[value.node_id].index]
                assert arts is not None
                return {"artifact": arts[value.output].content_hash}
            if isinstance(value, list | tuple):
                return [h(v) for v in value]
            if isinstance(value, dict):
                return {k: h(v) for k, v in value.items()}
            return value

        out: dict[str, Any] = {}
        for key, ref in node.direct_refs:
            out[key] = h(ref)
        for key, template in node.nested_refs:
            out[key] = h(template)
        return out

    async def _commit(self, sr: StepRun) -> None:
        # A step's final status is committed before its dependents start: a downstream step
        # may read it through the client (the seed's fan-in pattern). Concurrently finishing
        # steps share one group commit.
        await self.store.update_step_run(self.run, sr)

    def _persist(self, sr: StepRun) -> None:
        # Queued, not awaited: the store's writer task (see drive) commits it within a batch,
        # so status changes are stored as they happen without a step waiting on the disk.
        self.record(self.run, sr)

    async def _execute(self, i: int) -> bool:
        node = self.nodes[i]
        sr = self.step_runs[i]
        cfg: ResolvedStepConfig = node.config
        sr.start_time = _utcnow()
        if node.map_spec is not None:
            return await self._execute_map(i, node, sr)
        if cfg.enable_cache:
            if await self._cache_lookup(i, node, sr) is not None:
                return True
        if node.direct_refs or node.nested_refs:
            kwargs = await self._inputs(node)
        else:
            kwargs = dict(node.constants)
        if self.sem is not None:
            async with self.sem:
                outcome = await self.attempt_loop(node, sr, self.plans[i], kwargs)
        else:
            outcome = await self.attempt_loop(node, sr, self.plans[i], kwargs)
        if outcome is None:
            return False
        values, artifacts = outcome
        self.values[i] = values
        self.artifacts[i] = artifacts
        return True

    async def _cache_lookup(
        self, i: int, node: Node, sr: StepRun, element: Any = None,
    ) -> dict[str, ArtifactVersion] | None:
        """Look the step up in the cache; on a hit mark it CACHED and return its outputs."""
        try:
            hashes = self._input_hashes(node)
            if element is not None and node.map_spec is not None:
                # An element's key covers its own value, not the whole mapped sequence.
                for name in node.map_spec.mapped:
                    hashes.pop(name, None)
            key = compute_cache_key(node, hashes, self.plans[i].materializers, element)
        except CacheKeyError as exc:
            sr.cache_miss_reason = f"uncacheable: {exc}"
            if self.log_on:
                flog.log(_INFO, "cache_uncacheable", run=self.run.name, step=sr.name,
                         reason=str(exc))
            return None
        sr.cache_key = key
        hit = await self.store.find_cached(key)
        if hit is None:
            sr.cache_miss_reason = "no earlier step run with this cache key"
            if self.log_on:
                flog.log(_INFO, "cache_miss", run=self.run.name, step=sr.name,
                         reason=sr.cache_miss_reason)
            return None
        if not all(self.artifact_store.exists(a) for a in hit.outputs.values()):
            sr.cache_miss_reason = "an artifact of the cached step run is missing"
            if self.log_on:
                flog.log(_INFO, "cache_miss", run=self.run.name, step=sr.name,
                         reason=sr.cache_miss_reason)
            return None
        sr.status = StepStatus.CACHED
        sr.outputs = dict(hit.outputs)
        sr.cache_miss_reason = None
        sr.end_time = _utcnow()
        if element is None:
            self.artifacts[i] = sr.outputs
            self.values[i] = {name: _Lazy(a) for name, a in sr.outputs.items()}
        await self._commit(sr)
        if self.log_on:
            flog.log(_INFO, "cache_hit", run=self.run.name, step=sr.name,
                     cached_from=hit.pipeline_run_id)
        if events.listeners:
            _step_finished(self.run, sr)
        return sr.outputs

    # -- dynamic fan-out -------------------------------------------------------------------

    async def _execute_map(self, i: int, node: Node, sr: StepRun) -> bool:
        """Expand a `.map()` node into one invocation per element and gather the results."""
        assert node.map_spec is not None
        kwargs = await self._inputs(node)
        try:
            elements = _expand_elements(self.where, node, kwargs)
        except StepInputError as exc:
            await self._fail(sr, self.plans[i], exc)
            return False
        sr.status = StepStatus.RUNNING
        sr.attempts = 1
        self._persist(sr)
        if events.listeners:
            _emit(events.StepStarted(self.run.id, sr.name, 1, _utcnow()))
        results: list[Any] = [None] * len(elements)
        failed: list[BaseException] = []
        element_runs: list[StepRun] = []
        for k in range(len(elements)):
            eid = f"{node.id}[{k}]"
            esr = StepRun(id=uuid.uuid4().hex, name=eid, step_name=node.step.name,
                          pipeline_run_id=self.run.id,
                          config=StepRunConfig(
                              parameters={**sr.config.parameters, **elements[k]},
                              enable_cache=sr.config.enable_cache,
                              step_operator=sr.config.step_operator,
                              experiment_tracker=sr.config.experiment_tracker,
                              settings=sr.config.settings))
            esr.upstream = sr.upstream
            self.run.steps[eid] = esr
            element_runs.append(esr)

        async def one(k: int) -> None:
            esr = element_runs[k]
            esr.start_time = _utcnow()
            ekwargs = {**kwargs, **elements[k]}
            if node.config.enable_cache:
                hit = await self._cache_lookup(i, node, esr, element=_element_key(elements[k]))
                if hit is not None:
                    values = [await a.aload() for a in hit.values()]
                    results[k] = _combine(node, values)
                    return
            if self.sem is not None:
                async with self.sem:
                    outcome = await self.attempt_loop(node, esr, self.plans[i], ekwargs)
            else:
                outcome = await self.attempt_loop(node, esr, self.plans[i], ekwargs)
            if outcome is None:
                failed.append(self.first_error or RuntimeError(esr.name))
                if self.mode is ExecutionMode.FAIL_FAST:
                    for t in element_tasks:
                        if not t.done():
                            t.cancel()
                return
            results[k] = _combine(node, list(outcome[0].values()))

        element_tasks: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as tg:
                for k in range(len(elements)):
                    element_tasks.append(
                        tg.create_task(one(k), name=f"flowcore:{node.id}[{k}]"))
        except asyncio.CancelledError:
            for esr in element_runs:
                if not esr.status.is_finished:
                    esr.status = StepStatus.STOPPED
                    esr.end_time = _utcnow()
            raise
        for esr in element_runs:
            if not esr.status.is_finished:
                esr.status = StepStatus.STOPPED
                esr.end_time = _utcnow()
                self._persist(esr)
        if failed or any(e.status is StepStatus.STOPPED for e in element_runs):
            sr.status = StepStatus.FAILED
            sr.error = error_info(failed[0]) if failed else None
            sr.end_time = _utcnow()
            await self._commit(sr)
            if events.listeners:
                _step_finished(self.run, sr)
            return False
        try:
            artifacts = await self._store_outputs(node, sr, self.plans[i], {"output": results})
        except Exception as exc:
            await self._fail(sr, self.plans[i], exc)
            return False
        sr.outputs = artifacts
        sr.status = StepStatus.COMPLETED
        sr.end_time = _utcnow()
        await self._commit(sr)
        if events.listeners:
            _step_finished(self.run, sr)
        self.values[i] = {"output": results}
        self.artifacts[i] = artifacts
        return True

    async def attempt_loop(
        self, node: Node, sr: StepRun, plan: NodePlan, kwargs: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, ArtifactVersion]] | None:
        """Run a step's attempts (retries, timeout, hooks); None if it failed."""
        cfg: ResolvedStepConfig = node.config
        sig = node.step.signature
        hooks = plan.hooks
        policy = cfg.retry
        run_name = self.run.name
        ctx = StepContext(
            step_run=sr, pipeline_run=self.run, pipeline=self.prep.pipeline_info,
            stack=self.prep.stack, output_names=sig.output_names,
        )
        token = set_step_context(ctx)
        capture: list[str] | None = [] if self.prep.capture_logs else None
        capture_token = _capture.set_buffer(capture) if capture is not None else None
        try:
            attempt = 0
            while True:
                attempt += 1
                sr.attempts = attempt
                ctx.attempt = attempt
                sr.status = StepStatus.RUNNING
                self._persist(sr)
                if self.log_on:
                    # Each step runs in a task (or thread) of its own context: binding here
                    # never leaks into another step.
                    flog.bind_step(run_name, sr.name, attempt)
                    flog.log(_INFO, "step_started", run=run_name, step=sr.name, attempt=attempt)
                if events.listeners:
                    _emit(events.StepStarted(self.run.id, sr.name, attempt, _utcnow()))
                if "on_start" in hooks:
                    await self._call_hook(sr, hooks["on_start"])
                started = self.clock.monotonic() if self.log_on else 0.0
                try:
                    if attempt == 1 and sig.checked_inputs:
                        self._check_inputs(node, kwargs)
                    if plan.direct:
                        result = await node.step.func(**kwargs)
                    else:
                        result = await self._call_body(node, plan, kwargs, attempt)
                    values = self._split_outputs(node, result)
                    artifacts = (
                        await self._store_outputs(node, sr, plan, values) if values else {}
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not isinstance(exc, StepInputError) and should_retry(policy, attempt, exc):
                        assert policy is not None
                        delay = retry_delay(policy, attempt)
                        sr.status = StepStatus.RETRYING
                        sr.error = error_info(exc)
                        self._persist(sr)
                        # Retries are rare and waits long: make RETRYING durable before the
                        # wait starts (another process's client sees it at once).
                        await self.store.flush()
                        if self.log_on:
                            flog.log(_INFO, "step_retrying", run=run_name, step=sr.name,
                                     attempt=attempt, delay=delay, error=repr(exc))
                        if events.listeners:
                            _emit(events.StepRetrying(self.run.id, sr.name, attempt, delay,
                                                      repr(exc), _utcnow()))
                        if delay > 0:
                            await self.clock.sleep(delay)
                        continue
                    if capture:
                        sr.logs = "".join(capture)
                    await self._fail(sr, plan, exc)
                    return None
                sr.outputs = artifacts
                sr.status = StepStatus.COMPLETED
                sr.error = None
                sr.end_time = _utcnow()
                if capture:
                    sr.logs = "".join(capture)
                await self._commit(sr)
                if self.log_on:
                    flog.log(_INFO, "step_completed", run=run_name, step=sr.name,
                             attempt=attempt,
                             duration=round(self.clock.monotonic() - started, 6))
                if events.listeners:
                    _step_finished(self.run, sr)
                if hooks:
                    out = values[sig.output_names[0]] if len(values) == 1 else (
                        tuple(values.values()) if values else None
                    )
                    if "on_success" in hooks:
                        await self._call_hook(sr, hooks["on_success"], step_output=out)
                    if "on_end" in hooks:
                        await self._call_hook(sr, hooks["on_end"], step_output=out)
                return values, artifacts
        finally:
            if capture_token is not None:
                if capture and sr.logs is None:
                    sr.logs = "".join(capture)  # stopped mid-step: keep what it printed
                _capture.reset_buffer(capture_token)
            reset_step_context(token)

    async def _fail(self, sr: StepRun, plan: NodePlan, exc: BaseException) -> None:
        sr.status = StepStatus.FAILED
        sr.error = error_info(exc)
        sr.end_time = _utcnow()
        if self.first_error is None:
            self.first_error = exc
        await self._commit(sr)
        flog.log(logging.ERROR, "step_failed",
                 run=self.run.name, step=sr.name, attempt=sr.attempts, error=repr(exc))
        if events.listeners:
            _step_finished(self.run, sr)
        hooks = plan.hooks
        if "on_failure" in hooks:
            await self._call_hook(sr, hooks["on_failure"], exception=exc)
        if "on_end" in hooks:
            await self._call_hook(sr, hooks["on_end"], exception=exc)

    async def _call_hook(
        self, sr: StepRun, hook: BoundHook, *, exception: BaseException | None = None,
        step_output: Any = None,
    ) -> None:
        try:
            await hook.call(exception=exception, step_name=sr.name, step_output=step_output,
                            status=sr.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            sr.hook_errors.append(HookError(hook=hook.label, kind=hook.kind, error=error_info(exc)))
            flog.stdlib_logger.error(
                "hook_failed run=%s step=%s hook=%s kind=%s error=%r",
                self.run.name, sr.name, hook.label, hook.kind, exc,
                exc_info=exc,
                extra={"flowcore_event": "hook_failed",
                       "flowcore": {"run": self.run.name, "step": sr.name, "hook": hook.label,
                                    "kind": hook.kind, "error": repr(exc)}},
            )
            self._persist(sr)

    def _check_inputs(self, node: Node, kwargs: dict[str, Any]) -> None:
        inputs = node.step.signature.inputs
        for key, value in kwargs.items():
            spec = inputs.get(key)
            if spec is None or spec.check is None:
                continue
            try:
                spec.check(value)
            except (TypeError, ValueError) as exc:
                raise StepInputError(
                    f"{self.where}, step '{node.id}': input '{key}' has the wrong type: {exc}"
                ) from None

    async def _call_body(
        self, node: Node, plan: NodePlan, kwargs: dict[str, Any], attempt: int,
    ) -> Any:
        step = node.step
        operator = plan.operator
        tracker = plan.tracker
        if operator is None:
            operator = self.prep.stack.local_operator
        func = step.func
        if tracker is not None:
            # The tracker's context is entered where the body runs (a worker thread for a
            # sync body), since trackers such as MLflow keep their active run per thread.
            lock = None
            if step.is_async and getattr(tracker, "thread_bound", False):
                lock = self.tracker_locks.setdefault(id(tracker), asyncio.Lock())
            func = _tracked(func, tracker, step.is_async, lock,
                            pipeline_name=self.graph.pipeline_name,
                            run_name=self.run.name, step_name=node.id,
                            settings=plan.tracker_settings)
        coro = operator.run(func, kwargs, is_async=step.is_async,
                            settings=plan.operator_settings)
        return await self._with_timeout(node, coro, attempt)

    async def _with_timeout(self, node: Node, coro: Any, attempt: int) -> Any:
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

    def _split_outputs(self, node: Node, result: Any) -> dict[str, Any]:
        sig = node.step.signature
        outputs = sig.outputs
        if not outputs:
            return {}
        if not sig.multiple_outputs:
            spec = outputs[0]
            if spec.check is not None:
                self._check_output(node, spec.name, spec.check, result)
            return {spec.name: result}
        if not isinstance(result, tuple | list) or len(result) != len(outputs):
            got = f"{len(result)} values" if isinstance(result, tuple | list) else (
                type(result).__name__)
            raise StepOutputError(
                f"{self.where}, step '{node.id}' declares {len(outputs)} outputs "
                f"({', '.join(sig.output_names)}) but returned {got}"
            )
        values = {}
        for spec, value in zip(outputs, result, strict=True):
            if spec.check is not None:
                self._check_output(node, spec.name, spec.check, value)
            values[spec.name] = value
        return values

    def _check_output(self, node: Node, name: str, check: Callable[[Any], None], value: Any) -> None:
        try:
            check(value)
        except (TypeError, ValueError) as exc:
            raise StepOutputError(
                f"{self.where}, step '{node.id}': output '{name}' has the wrong type: {exc}"
            ) from None

    async def _store_outputs(
        self, node: Node, sr: StepRun, plan: NodePlan, values: dict[str, Any],
    ) -> dict[str, ArtifactVersion]:
        if not values:
            return {}
        from flowcore.materializers import materializer_for

        chosen = plan.materializers
        artifacts = {}
        for name, value in values.items():
            materializer = chosen.get(name) or chosen.get("*") or materializer_for(type(value))
            try:
                artifacts[name] = await self.artifact_store.save(
                    value,
                    materializer=materializer,
                    data_type=type(value),
                    name=name,
                    producer_step_run_id=sr.id,
                    step_label=f"{self.where}, step '{node.id}', output '{name}'",
                )
            except (MaterializerError, asyncio.CancelledError):
                raise
            except Exception as exc:
                raise MaterializerError(
                    f"{self.where}, step '{node.id}', output '{name}': cannot store "
                    f"{type(value).__name__} with {materializer.__name__}: {exc}"
                ) from exc
        return artifacts


def _expand_elements(where: str, node: Node, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    import itertools

    assert node.map_spec is not None
    names = node.map_spec.mapped
    sequences = []
    for name in names:
        value = kwargs[name]
        if isinstance(value, str | bytes) or not hasattr(value, "__len__") or not hasattr(
            value, "__iter__"
        ):
            raise StepInputError(
                f"{where}, step '{node.id}': mapped argument '{name}' must be a sequence, "
                f"not {type(value).__name__} (wrap it in unmapped() to pass it whole)"
            )
        sequences.append(list(value))
    if node.map_spec.product:
        combos = list(itertools.product(*sequences))
    else:
        lengths = {len(s) for s in sequences}
        if len(lengths) > 1:
            detail = ", ".join(f"{n}={len(s)}" for n, s in zip(names, sequences, strict=True))
            raise StepInputError(
                f"{where}, step '{node.id}': mapped arguments have different lengths ({detail}); "
                "wrap arguments that are not mapped in unmapped()"
            )
        combos = list(zip(*sequences, strict=True))
    return [dict(zip(names, combo, strict=True)) for combo in combos]


def _element_key(element: dict[str, Any]) -> Any:
    from flowcore._cache import canonical

    try:
        return canonical(element, "element")
    except CacheKeyError:
        from flowcore.materializers import content_hash_of, materializer_for

        return {k: content_hash_of(v, materializer_for(type(v)), type(v))
                for k, v in element.items()}


def _combine(node: Node, values: list[Any]) -> Any:
    sig = node.step.signature
    if not sig.outputs:
        return None
    if sig.multiple_outputs:
        return tuple(values)
    return values[0]


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


async def _shielded(coro: Any) -> Any:
    """Run a final bookkeeping write even while the run is being cancelled."""
    return await asyncio.shield(coro)


async def execute(prep: PreparedRun, *, raise_on_failure: bool = True) -> PipelineRun:
    """Record and run a prepared run on the caller's loop.

    Raises:
        RunNameConflictError: before any step runs.
        RunFailedError: a step failed (`.run` is the run, `__cause__` the first error).
        asyncio.CancelledError: the run was cancelled (it is recorded as STOPPED first).
    """
    run = prep.run
    store = await prep.stack.metadata_store()
    await _create_run(store, run)
    if flog.enabled(_INFO):
        flog.log(_INFO, "run_started", run=run.name, pipeline=run.pipeline_name,
                 steps=len(prep.graph.nodes), pid=os.getpid(), host=socket.gethostname())
    if events.listeners:
        _emit(events.RunStarted(run.id, run.name, run.pipeline_name,
                                tuple(run.steps), run.start_time))
    sched = _Scheduler(prep, store)
    cancelled = False
    if prep.capture_logs:
        _capture.install()
    try:
        await _with_heartbeat(store, run, sched.drive())
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        if prep.capture_logs:
            _capture.uninstall()
        sched._skip_pending()
        if cancelled:
            run.status = RunStatus.STOPPED
        elif any(sr.status is StepStatus.FAILED for sr in sched.step_runs):
            run.status = RunStatus.FAILED
        elif any(sr.status is StepStatus.STOPPED for sr in sched.step_runs):
            run.status = RunStatus.STOPPED
        else:
            run.status = RunStatus.COMPLETED
        run.end_time = _utcnow()
        prep.first_error = sched.first_error
        prep.values = sched.values
        await _shielded(_finalize(store, run, sched.step_runs))
        flog.log(logging.INFO, f"run_{run.status.value}", run=run.name,
                 pipeline=run.pipeline_name)
        if events.listeners:
            _emit(events.RunFinished(run.id, run.name, run.status.value, run.end_time))
    if run.status is RunStatus.FAILED and raise_on_failure:
        failed = [sr.name for sr in sched.step_runs if sr.status is StepStatus.FAILED]
        err = RunFailedError(
            f"run '{run.name}' of pipeline '{run.pipeline_name}' failed: step(s) "
            f"{', '.join(repr(f) for f in failed)} failed"
            + (f"; first error: {sched.first_error!r}" if sched.first_error else ""),
            run=run,
        )
        raise err from sched.first_error
    return run


async def execute_in_background(prep: PreparedRun) -> PipelineRun:
    """`execute` for a run a RunHandle owns: the handle's cancel() stops the run, which then
    ends STOPPED and is returned instead of the cancellation."""
    try:
        return await execute(prep)
    except asyncio.CancelledError:
        if prep.run.status is RunStatus.STOPPED:
            return prep.run
        raise


def mark_unstarted_stopped(run: PipelineRun) -> PipelineRun:
    """A run cancelled before any step started: STOPPED, its steps SKIPPED."""
    if run.status is RunStatus.RUNNING:
        now = _utcnow()
        run.status = RunStatus.STOPPED
        run.end_time = now
        for sr in run.steps.values():
            if sr.status is StepStatus.PENDING:
                sr.status = StepStatus.SKIPPED
                sr.end_time = now
    return run


async def _create_run(store: MetadataStore, run: PipelineRun) -> None:
    """Record the run; a cancellation that arrives meanwhile lets the write finish and records
    the run STOPPED, so the store never keeps a RUNNING run nobody runs."""
    write = asyncio.get_running_loop().create_task(store.create_run(run),
                                                   name=f"flowcore:create:{run.name}")
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        await asyncio.wait({write})
        mark_unstarted_stopped(run)
        if not write.cancelled() and write.exception() is None:
            await _shielded(_finalize(store, run, list(run.steps.values())))
        raise


async def _finalize(store: MetadataStore, run: PipelineRun, step_runs: list[StepRun]) -> None:
    # Steps that ended without a write of their own (skipped, stopped) are queued here; then
    # every queued write is committed before the run's own row says it ended.
    unwritten = (StepStatus.SKIPPED, StepStatus.STOPPED, StepStatus.FAILED)
    for sr in step_runs:
        if sr.status in unwritten:
            store.record_step_run(run, sr)
    if len(run.steps) > len(step_runs):
        # Elements of dynamic fan-outs live only in run.steps.
        known = {id(sr) for sr in step_runs}
        for sr in run.steps.values():
            if id(sr) not in known and sr.status in unwritten:
                store.record_step_run(run, sr)
    await store.flush()
    await store.update_run(run)


async def _with_heartbeat(store: MetadataStore, run: PipelineRun, work: Any) -> None:
    beat = getattr(store, "heartbeat", None)
    if beat is None:
        await work
        return

    async def beating() -> None:
        while True:
            await asyncio.sleep(10)
            await beat(run)

    async with asyncio.TaskGroup() as tg:
        beater = tg.create_task(beating(), name=f"flowcore:heartbeat:{run.name}")
        try:
            await work
        finally:
            beater.cancel()


