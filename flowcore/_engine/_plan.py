"""The run plan: everything checked and resolved before any step runs, then frozen.

Binds hooks, resolves materializers, step operators, trackers and their settings once per
step (shared by all invocations of it), names the run and creates its step-run records.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flowcore import _logging as flog
from flowcore._clock import SystemClock, utcnow
from flowcore._compile import ResolvedStepConfig
from flowcore._graph import Graph
from flowcore._hooks import HOOK_KINDS, BoundHook, bind_hook
from flowcore._ids import new_id
from flowcore._models import (
    PipelineRun,
    StepRun,
    StepRunConfig,
)
from flowcore._naming import DEFAULT_RUN_NAME, format_run_name
from flowcore._threads import max_threads
from flowcore.config import ExecutionMode, config_errors
from flowcore.context import PipelineInfo
from flowcore.exceptions import (
    ConfigError,
)
from flowcore.stack import Stack
from flowcore.typing import Clock

__all__ = ["NodePlan", "RunPlan", "check_run_limits", "new_run", "prepare_run"]

_SYSTEM_CLOCK = SystemClock()


class NodePlan:
    """Per-node things resolved once before the run starts (hooks, materializers, operator)."""

    __slots__ = ("direct", "hooks", "materializers", "operator", "operator_settings", "tracker",
                 "tracker_settings")

    def __init__(self) -> None:
        self.hooks: dict[str, BoundHook] = {}
        self.materializers: dict[str, type[Any]] = {}
        self.operator: Any = None
        self.tracker: Any = None
        self.operator_settings: Any = None
        self.tracker_settings: Any = None
        # An async body awaited as it is: no operator, tracker or timeout around it.
        self.direct = False


_KNOWN_SETTINGS = frozenset({"step_operator", "experiment_tracker", "orchestrator", "alerter"})


def _validated_settings(cfg: ResolvedStepConfig, kind: str, component: Any, where: str) -> Any:
    """Validate `settings["<kind>"]` / `settings["<kind>.<flavor>"]` with the component's model.

    Settings for a component the step does not use are logged, not fatal.
    """
    if not cfg.settings:
        return None
    keys = [k for k in cfg.settings if k == kind or k.startswith(kind + ".")]
    if not keys:
        return None
    if component is None:
        for key in keys:
            flog.log(logging.WARNING, "settings_unused", where=where, key=key,
                     reason=f"the step uses no {kind}")
        return None
    chosen = None
    for key in keys:
        flavor = key.partition(".")[2]
        if flavor and flavor != component.flavor:
            flog.log(logging.WARNING, "settings_unused", where=where, key=key,
                     reason=f"the step's {kind} is of flavor '{component.flavor}'")
            continue
        with config_errors(f"{where}: settings '{key}'"):
            validated = component.SETTINGS.model_validate(cfg.settings[key])
        if chosen is None or flavor:
            chosen = validated
    return chosen


class RunPlan:
    """A run checked and named, ready to execute; all errors so far are raised before this."""

    def __init__(
        self,
        *,
        graph: Graph,
        stack: Stack,
        run: PipelineRun,
        plans: list[NodePlan],
        mode: ExecutionMode,
        max_concurrency: int | None,
        clock: Clock,
        pipeline_info: PipelineInfo,
        single_step: bool = False,
        capture_logs: bool = True,
        timeout: float | None = None,
        resume: Mapping[str, StepRun] | None = None,
    ) -> None:
        self.graph = graph
        self.capture_logs = capture_logs
        self.stack = stack
        self.run = run
        self.plans = plans
        self.mode = mode
        self.max_concurrency = max_concurrency
        self.timeout = timeout  # the run's deadline, in seconds from its start
        # Resuming: the original run's reusable step runs by invocation ID (see _scheduler).
        self.resume: Mapping[str, StepRun] = resume or {}
        self.clock = clock
        self.pipeline_info = pipeline_info
        self.single_step = single_step
        # Filled in by the run: whether it began (a background run cancelled before its task
        # first ran never did), the first step error and, for single-step runs, the values.
        self.started = False
        self.first_error: BaseException | None = None
        self.values: list[dict[str, Any] | None] = []


def _bind_plans(graph: Graph, stack: Stack) -> list[NodePlan]:
    from flowcore.materializers import resolve_materializer

    bound: dict[tuple[int, str], BoundHook] = {}
    plans: list[NodePlan] = []
    append = plans.append
    # Invocations of one step share their resolved hooks/settings/materializers objects (see
    # _compile_static), so they can share one plan: a 10,000-way fan-out binds once.
    shared: dict[tuple[object, ...], NodePlan] = {}
    last: tuple[Any, ...] = ()
    plan: NodePlan | None = None
    for node in graph.nodes:
        cfg: ResolvedStepConfig = node.config
        hooks, settings, materializers = cfg.hooks, cfg.settings, cfg.output_materializers
        unmapped = node.map_spec is None
        # Consecutive invocations of one step (a fan-out, a chain) skip the key lookup.
        if (plan is not None and last[0] is node.step and last[1] is hooks
                and last[2] is settings and last[3] is materializers
                and last[4] == unmapped and last[5] == cfg.pool):
            append(plan)
            continue
        last = (node.step, hooks, settings, materializers, unmapped, cfg.pool)
        share_key = (id(node.step), id(hooks), id(settings), id(materializers), unmapped,
                     cfg.pool)
        plan = shared.get(share_key)
        if plan is not None:
            append(plan)
            continue
        where = f"pipeline '{graph.pipeline_name}', step '{node.id}'"
        plan = shared[share_key] = NodePlan()
        for kind in HOOK_KINDS:
            hook = cfg.hooks.get(kind)
            if hook is None:
                continue
            key = (id(hook), kind)
            b = bound.get(key)
            if b is None:
                b = bound[key] = bind_hook(hook, kind, where)
            plan.hooks[kind] = b
        for out_name, spec in cfg.output_materializers.items():
            if out_name != "*" and out_name not in node.step.signature.output_names and (
                node.map_spec is None
            ):
                raise ConfigError(
                    f"{where}: output_materializers names output '{out_name}', which the step "
                    f"does not have (outputs: {', '.join(node.step.signature.output_names)})"
                )
            plan.materializers[out_name] = resolve_materializer(
                spec, where=f"{where}, output '{out_name}'"
            )
        if cfg.pool is not None and cfg.pool not in stack.pools:
            known = ", ".join(sorted(stack.pools.limits)) or "none"
            raise ConfigError(
                f"{where}: pool '{cfg.pool}' is not a pool of the stack (it has: {known}); "
                "add it with stack.with_pools(...) or `pools:` in the stack YAML"
            )
        if cfg.step_operator is not None:
            try:
                plan.operator = stack.step_operator(cfg.step_operator)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        if cfg.experiment_tracker is not None:
            try:
                plan.tracker = stack.experiment_tracker(cfg.experiment_tracker)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        plan.operator_settings = _validated_settings(
            cfg, "step_operator", plan.operator, where)
        plan.tracker_settings = _validated_settings(
            cfg, "experiment_tracker", plan.tracker, where)
        for setting in cfg.settings:
            kind = setting.split(".", 1)[0]
            if kind not in _KNOWN_SETTINGS and flog.enabled(logging.WARNING):
                flog.log(logging.WARNING, "settings_unused", pipeline=graph.pipeline_name,
                         step=node.id, key=setting,
                         reason="no stack component of this type uses it")
        plan.direct = (plan.operator is None and plan.tracker is None and cfg.timeout is None
                       and node.step.signature.is_async)
        append(plan)
    return plans


def check_run_limits(pipeline_name: str, max_concurrency: int | None) -> None:
    """`max_concurrency` and FLOWCORE_MAX_THREADS, checked before a run is recorded.

    Raises:
        ConfigError: either is not a whole number >= 1.
    """
    max_threads()
    if max_concurrency is not None and max_concurrency < 1:
        raise ConfigError(
            f"pipeline '{pipeline_name}': max_concurrency must be >= 1, not {max_concurrency}"
        )


def new_run(pipeline_name: str, run_name: str | None,
            substitutions: Mapping[str, str] | None, *, unlisted: bool = False) -> PipelineRun:
    """A new run record, named and timed now, with no steps yet."""
    now = utcnow()
    run_id = new_id()
    name = format_run_name(
        run_name or DEFAULT_RUN_NAME,
        pipeline_name=pipeline_name,
        run_id=run_id,
        now=now,
        substitutions=substitutions,
    )
    return PipelineRun(id=run_id, name=name, pipeline_name=pipeline_name, start_time=now,
                       unlisted=unlisted)


def prepare_run(
    graph: Graph,
    *,
    stack: Stack,
    mode: ExecutionMode,
    max_concurrency: int | None,
    clock: Clock | None,
    run_name: str | None,
    substitutions: Mapping[str, str] | None,
    unlisted: bool = False,
    single_step: bool = False,
    capture_logs: bool = True,
    timeout: float | None = None,
    resume: Mapping[str, StepRun] | None = None,
    run: PipelineRun | None = None,
) -> RunPlan:
    """Check everything that can be checked without running a step, and name the run.

    `run` is a record made earlier (`new_run`: a background run's handle exists before its
    plan); its steps are filled in here.

    Raises:
        PipelineDefinitionError, ConfigError, MaterializerError: before any step runs.
    """
    plans = _bind_plans(graph, stack)
    check_run_limits(graph.pipeline_name, max_concurrency)
    if run is None:
        run = new_run(graph.pipeline_name, run_name, substitutions, unlisted=unlisted)
    run.parameters = dict(graph.parameters)
    run_id = run.id
    steps = run.steps
    nodes = graph.nodes
    for node in nodes:
        cfg: ResolvedStepConfig = node.config
        sr = steps[node.id] = StepRun(
            id=f"{run_id}-{node.index}",
            name=node.id,
            step_name=node.step.name,
            pipeline_run_id=run_id,
            # Shared with the resolved config (both are read-only once compiled).
            config=StepRunConfig(
                cfg.parameters, cfg.enable_cache, cfg.step_operator, cfg.experiment_tracker,
                cfg.settings,
            ),
        )
        if node.parents:
            sr.upstream = tuple(nodes[p].id for p in node.parents)
    return RunPlan(
        graph=graph,
        stack=stack,
        run=run,
        plans=plans,
        mode=mode,
        max_concurrency=max_concurrency,
        clock=clock or _SYSTEM_CLOCK,
        pipeline_info=PipelineInfo(graph.pipeline_name),
        single_step=single_step,
        capture_logs=capture_logs,
        timeout=timeout,
        resume=resume,
    )


