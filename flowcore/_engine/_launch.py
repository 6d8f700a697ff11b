"""Every way a user starts a run: `await p.run()`, `p()`, `p.submit()`, a non-synchronous
call on a thread of its own, and a single step called outside a pipeline.

The definition layer reaches the engine only through this module (one late import each from
`_pipeline.py` and `_step.py`); the running-loop check for synchronous calls lives here once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from flowcore._engine._handle import RunHandle, execute_owned
from flowcore._engine._invocation import loaded_values
from flowcore._engine._outputs import output_value
from flowcore._engine._plan import RunPlan, check_run_limits, prepare_run
from flowcore._engine._run import execute
from flowcore._engine._submit import BACKGROUND, check_call, submit_later
from flowcore._models import PipelineRun, RunStatus, StepRun, StepStatus
from flowcore.config import ExecutionMode, RunConfigFile
from flowcore.exceptions import ConfigError, FlowcoreError, RunStateError
from flowcore.stack import Stack, get_active_stack
from flowcore.stores._sqlite_catchup import reads_wait_for_own_writes

if TYPE_CHECKING:
    from flowcore._pipeline import Pipeline
    from flowcore._step import Step

__all__ = [
    "RunHandle",
    "call_pipeline",
    "ensure_no_running_loop",
    "run_pipeline",
    "run_step_async",
    "run_step_sync",
    "submit_pipeline",
]

T = TypeVar("T")



def ensure_no_running_loop(what: str, instead: str) -> None:
    """Refuse a blocking call on a thread whose event loop is running (it would deadlock).

    Raises:
        SyncCallOnLoopError: naming what was called and the `await` form to use instead.
    """
    from flowcore._pipeline import SyncCallOnLoopError

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise SyncCallOnLoopError(
        f"{what} was called synchronously on a thread whose event loop is running; "
        f"use {instead} instead"
    )


# -- pipelines -------------------------------------------------------------------------------


def plan_pipeline_run(
    pipeline: Pipeline, args: tuple[Any, ...], params: Mapping[str, Any],
    original: PipelineRun | None = None, run: PipelineRun | None = None,
    resolved: tuple[dict[str, Any], RunConfigFile | None] | None = None,
) -> tuple[RunPlan, Mapping[str, Any]]:
    """Compile, resolve and check everything before a run is recorded.

    Raises:
        PipelineDefinitionError, ConfigError, MaterializerError: before any step runs.
    """
    from flowcore._pipeline import _mode

    options, run_config = resolved or pipeline._resolved_options()
    where = f"pipeline '{pipeline.name}'"
    if original is not None and not args and not params:
        params = original.parameters  # a resumed run reuses the original's parameters
    graph = pipeline._compile(options, run_config, args, params)
    chosen = _stack_of(pipeline)
    _check_orchestrator_settings(options, where)
    plan = prepare_run(
        graph,
        stack=chosen,
        mode=_mode(options.get("execution_mode") or ExecutionMode.CONTINUE_ON_FAILURE, where),
        max_concurrency=options.get("max_concurrency"),
        clock=options.get("clock"),
        run_name=options.get("run_name"),
        substitutions=options.get("substitutions"),
        capture_logs=bool(options.get("capture_logs", True)),
        timeout=options.get("timeout"),
        resume=_reusable(original),
        run=run,
    )
    run = plan.run
    run.source = f"{pipeline.func.__module__}:{pipeline.func.__qualname__}"
    if original is not None:
        run.resumed_from = original.id
    return plan, options


def _check_orchestrator_settings(options: Mapping[str, Any], where: str) -> None:
    orch = (options.get("settings") or {}).get("orchestrator") or {}
    if not isinstance(orch, Mapping):
        raise ConfigError(f"{where}: settings 'orchestrator' must be a mapping")
    unknown = set(orch) - {"synchronous"}
    if unknown:
        raise ConfigError(
            f"{where}: settings 'orchestrator' has unknown key '{sorted(unknown)[0]}' "
            "(known: synchronous)"
        )


def _reusable(original: PipelineRun | None) -> dict[str, StepRun] | None:
    if original is None:
        return None
    return {name: sr for name, sr in original.steps.items()
            if sr.status in (StepStatus.COMPLETED, StepStatus.CACHED) and "[" not in name}


async def _original_run(pipeline: Pipeline, stack: Stack) -> PipelineRun | None:
    """The run `resume_from=` names, checked: it may not be running in a live process.

    Raises:
        RunStateError: the run is still running.
        RunNotFoundError: no such run in the stack's metadata store.
    """
    resume_from = pipeline._resolved_options()[0].get("resume_from")
    if resume_from is None:
        return None
    key = resume_from.id if isinstance(resume_from, PipelineRun) else str(resume_from)
    store = await stack.metadata_store()
    original = await store.get_run(key)
    if original.status is RunStatus.RUNNING:
        live = stack.live_runs.get(original.id) is not None
        if not live:
            is_live = getattr(store, "run_is_live", None)
            live = True if is_live is None else bool(await is_live(original.id))
        if live:
            raise RunStateError(
                f"pipeline '{pipeline.name}': run '{original.name}' is still running in a live "
                "process and cannot be resumed; cancel it first (Client().cancel_run) or wait "
                "for it to end"
            )
    if original.pipeline_name != pipeline.name:
        raise ConfigError(
            f"pipeline '{pipeline.name}': resume_from names run '{original.name}' of pipeline "
            f"'{original.pipeline_name}'"
        )
    return original


def _stack_of(pipeline: Pipeline) -> Stack:
    chosen = pipeline._resolved_options()[0].get("stack") or get_active_stack()
    if not isinstance(chosen, Stack):
        raise ConfigError(f"pipeline '{pipeline.name}': stack= must be a Stack, not {chosen!r}")
    return chosen


async def run_pipeline(pipeline: Pipeline, args: tuple[Any, ...],
                       params: Mapping[str, Any]) -> PipelineRun:
    """`await p.run(...)`: run on the caller's loop."""
    original = await _original_run(pipeline, _stack_of(pipeline))
    plan, _ = plan_pipeline_run(pipeline, args, params, original)
    return await execute(plan)


def submit_pipeline(pipeline: Pipeline, args: tuple[Any, ...],
                    params: Mapping[str, Any]) -> RunHandle:
    """`p.submit(...)`: start a background run on the running loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise FlowcoreError(
            f"pipeline '{pipeline.name}': submit() needs a running event loop; from "
            "synchronous code use pipeline.with_options(synchronous=False)(...)"
        ) from None
    options, run_config = pipeline._resolved_options()
    if options.get("resume_from") is not None:
        # The original run is read before the handle exists (its parameters shape the graph):
        # a short read on a thread of its own, the one wait submit() makes.
        original = _in_own_loop(lambda: _original_run(pipeline, _stack_of(pipeline)))
        plan, _ = plan_pipeline_run(pipeline, args, params, original)
        task = loop.create_task(execute_owned(plan), name=f"flowcore:run:{plan.run.name}")
        BACKGROUND.add(task)
        task.add_done_callback(BACKGROUND.discard)
        return RunHandle(plan, task=task)
    # The compile and plan happen on the run's own task (see _submit): what is cheap to check
    # is checked here, so the commonest mistakes still raise from submit() itself.
    from flowcore._pipeline import _mode

    where = f"pipeline '{pipeline.name}'"
    stack = _stack_of(pipeline)
    _mode(options.get("execution_mode") or ExecutionMode.CONTINUE_ON_FAILURE, where)
    _check_orchestrator_settings(options, where)
    check_run_limits(pipeline.name, options.get("max_concurrency"))
    check_call(pipeline, run_config, args, params)
    # The options as they are now: a configure() after submit() is for later runs.
    plan_for = functools.partial(_plan_into, pipeline, args, params, (options, run_config))
    return submit_later(pipeline, stack, options, plan_for)


def _plan_into(pipeline: Pipeline, args: tuple[Any, ...], params: Mapping[str, Any],
               resolved: tuple[dict[str, Any], RunConfigFile | None],
               run: PipelineRun) -> RunPlan:
    return plan_pipeline_run(pipeline, args, params, run=run, resolved=resolved)[0]


def call_pipeline(pipeline: Pipeline, args: tuple[Any, ...],
                  params: Mapping[str, Any]) -> PipelineRun | RunHandle:
    """`p(...)` from synchronous code: block until the run ends, or (`synchronous=False`)
    start it on a thread of its own and return its handle."""
    ensure_no_running_loop(
        f"pipeline '{pipeline.name}'",
        f"`await {pipeline.name}.run(...)` (or `.submit(...)` for a background run)",
    )
    original = None
    if pipeline._resolved_options()[0].get("resume_from") is not None:
        original = _in_own_loop(lambda: _original_run(pipeline, _stack_of(pipeline)))
    plan, options = plan_pipeline_run(pipeline, args, params, original)
    synchronous = options.get("synchronous")
    if synchronous is None:
        orch = (options.get("settings") or {}).get("orchestrator") or {}
        synchronous = orch.get("synchronous", True)
    if synchronous:
        return _run_sync_with_stack(plan.stack, lambda: execute(plan))
    return _run_in_thread(plan)


def _in_own_loop(make: Callable[[], Awaitable[T]]) -> T:
    """Run a short coroutine to its end on a fresh loop in a thread of its own (usable from
    sync code and from a thread whose loop is running)."""
    result: concurrent.futures.Future[T] = concurrent.futures.Future()

    def target() -> None:
        # The caller's loop is blocked until this returns: reads here must not wait for
        # writes queued on it (see stores/_sqlite_catchup).
        reads_wait_for_own_writes.set(False)
        try:
            result.set_result(asyncio.run(_awaited(make)))
        except BaseException as exc:
            result.set_exception(exc)

    thread = threading.Thread(target=target, name="flowcore:lookup", daemon=True)
    thread.start()
    return result.result()


async def _awaited(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


def _run_sync_with_stack(stack: Stack, make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a fresh event loop, closing the stack's store for that loop after."""

    async def main() -> T:
        try:
            return await make()
        finally:
            await asyncio.shield(stack.close())

    return asyncio.run(main())


def _run_in_thread(plan: RunPlan) -> RunHandle:
    """Start the run on a new thread with its own loop; the handle's `.result()` blocks."""
    future: concurrent.futures.Future[PipelineRun] = concurrent.futures.Future()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> PipelineRun:
        holder["loop"] = asyncio.get_running_loop()
        holder["task"] = asyncio.current_task()
        started.set()
        try:
            return await execute_owned(plan)
        finally:
            await asyncio.shield(plan.stack.close())

    def target() -> None:
        try:
            result = asyncio.run(main())
        except BaseException as exc:
            started.set()
            future.set_exception(exc)
        else:
            future.set_result(result)

    thread = threading.Thread(target=target, name=f"flowcore:{plan.run.name}", daemon=False)
    thread.start()
    started.wait()
    return RunHandle(plan, future=future, loop=holder.get("loop"),
                     thread_task=holder.get("task"))


# -- single steps ----------------------------------------------------------------------------


async def run_step_async(step: Step, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run `step` alone (caching off, as in ZenML) and return its output value(s).

    The step's own error (a StepInputError for a wrong input) is raised directly.
    """
    from flowcore._compile import compile_graph, recording

    pipeline_name = f"{step.name}_single_step"
    single = step.with_options(enable_cache=False)
    with recording(pipeline_name) as recorder:
        single(*args, **kwargs)
    graph = compile_graph(pipeline_name, recorder, {"enable_cache": False})
    plan = prepare_run(
        graph,
        stack=get_active_stack(),
        mode=ExecutionMode.FAIL_FAST,
        max_concurrency=None,
        clock=None,
        run_name="{pipeline_name}-{date}-{time}-{run_id}",
        substitutions=None,
        unlisted=True,
        single_step=True,
    )
    node = graph.nodes[0]
    run = await execute(plan, raise_on_failure=False)
    step_run = run.steps[node.id]
    if step_run.status is not StepStatus.COMPLETED:
        if plan.first_error is not None:
            raise plan.first_error
        raise FlowcoreError(f"single-step run '{run.name}' ended {step_run.status.value}")
    # An output a remote worker stored (or a cache hit) is loaded here: the caller gets the value.
    return output_value(node, await loaded_values(plan.values[0] or {}))


def run_step_sync(step: Step, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`run_step_async` from synchronous code (refuses on a thread with a running loop)."""
    ensure_no_running_loop(f"step '{step.name}' (outside a pipeline)",
                           f"`await {step.name}.run(...)`")
    return _run_sync_with_stack(get_active_stack(), lambda: run_step_async(step, args, kwargs))
