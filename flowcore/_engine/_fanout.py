"""`.map()` / `.product()`: one invocation per element of a sequence known only at run time.

The elements run as tasks of a task group of their own inside the mapped node's task; under
FAIL_FAST a failing element's failure cancels the run's steps task, and with it this group.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from flowcore._canonical import CacheKeyError, canonical
from flowcore._clock import utcnow
from flowcore._engine._invocation import STOPPED, Invoker, Outcome
from flowcore._engine._isolation import isolated
from flowcore._engine._outputs import output_value, store_outputs
from flowcore._engine._plan import NodePlan
from flowcore._graph import Node
from flowcore._models import StepRun, StepRunConfig, StepStatus
from flowcore.exceptions import StepInputError

__all__ = ["run_map"]


def expand_elements(where: str, node: Node, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The mapped arguments of each element, in order.

    Raises:
        StepInputError: a mapped argument is not a sequence, or zipped lengths differ.
    """
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
    try:
        return canonical(element, "element")
    except CacheKeyError:
        from flowcore.materializers import content_hash_of, materializer_for

        return {k: content_hash_of(v, materializer_for(type(v)), type(v))
                for k, v in element.items()}


async def run_map(invoker: Invoker, node: Node, sr: StepRun,
                  node_plan: NodePlan, kwargs: dict[str, Any],
                  input_hashes: dict[str, Any]) -> Outcome:
    """Expand a mapped node into element invocations and gather their results in order."""
    life = invoker.lifecycle
    gate = invoker.gate
    assert node.map_spec is not None
    try:
        elements = expand_elements(invoker.where, node, kwargs)
    except StepInputError as exc:
        await invoker.fail(node, sr, node_plan, exc)
        return Outcome(False, error=exc)
    if not life.step_running(sr, 1):
        return STOPPED
    for name in node.map_spec.mapped:
        # An element's key covers its own value, not the whole mapped sequence.
        input_hashes.pop(name, None)
    run = life.run
    element_runs: list[StepRun] = []
    for k, element in enumerate(elements):
        esr = StepRun(id=f"{sr.id}[{k}]", name=f"{node.id}[{k}]", step_name=node.step.name,
                      pipeline_run_id=run.id,
                      config=StepRunConfig(
                          parameters={**sr.config.parameters, **element},
                          enable_cache=sr.config.enable_cache,
                          step_operator=sr.config.step_operator,
                          experiment_tracker=sr.config.experiment_tracker,
                          settings=sr.config.settings))
        esr.upstream = sr.upstream
        life.step_added(esr)
        element_runs.append(esr)
    results: list[Any] = [None] * len(elements)
    errors: list[BaseException] = []
    slots = gate.slots

    async def one(k: int) -> None:
        esr = element_runs[k]
        if not gate.may_start():
            life.steps_skipped([esr])
            return
        esr.start_time = utcnow()
        if node.config.enable_cache:
            hit = await invoker.lookup(node, esr, node_plan, dict(input_hashes),
                                       element=_element_key(elements[k]))
            if hit is not None:
                values = [await a.aload() for a in hit.values()]
                results[k] = output_value(node, values)
                return
        # Each element its own copies: of its element, and of the arguments passed whole.
        ekwargs = {name: await isolated(v) for name, v in {**kwargs, **elements[k]}.items()}
        if slots is None:
            outcome = await invoker.invoke(node, esr, node_plan, ekwargs)
        else:
            async with slots:
                if not gate.may_start():
                    life.steps_skipped([esr])
                    return
                outcome = await invoker.invoke(node, esr, node_plan, ekwargs)
        if outcome.ok:
            assert outcome.values is not None
            results[k] = output_value(node, outcome.values)
        elif outcome.error is not None:
            errors.append(outcome.error)

    try:
        async with asyncio.TaskGroup() as tg:
            for k in range(len(elements)):
                tg.create_task(one(k), name=f"flowcore:{node.id}[{k}]")
    except asyncio.CancelledError:
        if errors:  # FAIL_FAST: an element failed and the run's steps are being cancelled
            life.step_failed(sr, errors[0])
        for esr in element_runs:
            life.step_stopped(esr)
        life.step_stopped(sr)
        raise
    for esr in element_runs:
        life.step_stopped(esr)  # never began (skipped) or began and did not finish
    if errors or any(e.status is not StepStatus.COMPLETED
                     and e.status is not StepStatus.CACHED for e in element_runs):
        error = errors[0] if errors else None
        life.step_failed(sr, error)
        return Outcome(False, error=error)
    try:
        artifacts = await store_outputs(invoker.where, node, sr, node_plan,
                                        invoker.artifact_store, {"output": results})
    except Exception as exc:
        await invoker.fail(node, sr, node_plan, exc)
        return Outcome(False, error=exc)
    if not life.step_completed(sr, artifacts, None):
        return STOPPED
    if invoker.flush is not None:  # see Invoker.__init__
        await invoker.flush()
    return Outcome(True, {"output": results}, artifacts)
