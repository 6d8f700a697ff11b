"""A step called outside a pipeline: an unlisted one-step run that returns the step's value."""

from __future__ import annotations

import asyncio
from typing import Any

from flowcore._compile import compile_graph, recording
from flowcore._models import StepStatus
from flowcore._prepare import prepare_run
from flowcore._runner import execute
from flowcore._step import Step
from flowcore.config import ExecutionMode
from flowcore.exceptions import FlowcoreError
from flowcore.stack import get_active_stack

__all__ = ["run_step_async", "run_step_sync"]


async def run_step_async(step: Step, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run `step` alone (caching off, as in ZenML) and return its output value(s).

    The step's own error (a StepInputError for a wrong input) is raised directly.
    """
    pipeline_name = f"{step.name}_single_step"
    single = step.with_options(enable_cache=False)
    with recording(pipeline_name) as recorder:
        single(*args, **kwargs)
    graph = compile_graph(pipeline_name, recorder, {"enable_cache": False})
    prep = prepare_run(
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
    run = await execute(prep, raise_on_failure=False)
    step_run = run.steps[node.id]
    if step_run.status is not StepStatus.COMPLETED:
        if prep.first_error is not None:
            raise prep.first_error
        raise FlowcoreError(f"single-step run '{run.name}' ended {step_run.status.value}")
    values = prep.values[0] or {}
    sig = step.signature
    if not sig.outputs:
        return None
    if sig.multiple_outputs:
        return tuple(values[name] for name in sig.output_names)
    return values[sig.output_names[0]]


def run_step_sync(step: Step, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`run_step_async` from synchronous code (refuses on a thread with a running loop)."""
    from flowcore._pipeline import SyncCallOnLoopError
    from flowcore._sync import run_sync_with_stack

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise SyncCallOnLoopError(
            f"step '{step.name}' was called outside a pipeline on a thread whose event loop is "
            f"running; use `await {step.name}.run(...)` instead"
        )
    return run_sync_with_stack(get_active_stack(), lambda: run_step_async(step, args, kwargs))
