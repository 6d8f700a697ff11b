"""Recording invocations while a pipeline function runs, and compiling them to a Graph."""

from __future__ import annotations

import contextvars
import difflib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flowcore._arguments import ArgumentPlace, Where, to_refs
from flowcore._graph import Graph, MapSpec, Node, OutputRef, contains_ref, iter_refs
from flowcore._step import OutputHandle, Step, unmapped
from flowcore.config import (
    CachePolicy,
    RunConfigFile,
    StepConfigFile,
    StepRetryConfig,
    as_cache_policy,
    config_errors,
    env_flag,
)
from flowcore.exceptions import ConfigError, PipelineDefinitionError, StepInputError

__all__ = ["Recorder", "ResolvedStepConfig", "compile_graph", "current_recorder"]

_HOOK_KINDS = ("on_start", "on_success", "on_failure", "on_end")
_recorder: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "flowcore_recorder", default=None
)


def current_recorder() -> Recorder | None:
    """The recorder of the pipeline function running now, if any."""
    return _recorder.get()


@dataclass(slots=True)
class ResolvedStepConfig:
    """One invocation's configuration after step > YAML > pipeline > default resolution."""

    enable_cache: bool
    retry: StepRetryConfig | None
    hooks: Mapping[str, Any]
    timeout: float | None
    output_materializers: Mapping[str, Any]
    settings: dict[str, Any]
    step_operator: str | None
    experiment_tracker: str | None
    parameters: dict[str, Any]
    enable_artifact_metadata: bool = True
    # Step explicit > pipeline explicit > None; a whole policy wins, fields are not merged.
    cache_policy: CachePolicy | None = None
    pool: str | None = None
    log_limit: int | None = None  # None: flowcore's default (the last 1 MB)


@dataclass(slots=True)
class _Invocation:
    id: str
    step: Step
    arguments: dict[str, Any]
    after_ids: list[str] = field(default_factory=list)
    mapping: str | None = None
    mapped: tuple[str, ...] = ()


def _after_ids(after: Any) -> Iterator[str]:
    if after is None:
        return
    if type(after) is list and all(type(a) is OutputHandle for a in after):
        yield from (a.invocation_id for a in after)
        return
    if isinstance(after, str):
        yield after
    elif isinstance(after, OutputHandle):
        yield after.invocation_id
    elif isinstance(after, list | tuple | set | frozenset):
        for a in after:
            yield from _after_ids(a)
    else:
        raise PipelineDefinitionError(
            f"after= takes invocation IDs or output handles, not {type(after).__name__}"
        )


class Recorder:
    """Collects step invocations while a pipeline function runs."""

    def __init__(self, pipeline_name: str, func: Any = None) -> None:
        self.pipeline_name = pipeline_name
        self.invocations: dict[str, _Invocation] = {}
        self._next_suffix: dict[str, int] = {}
        # The pipelines whose functions are running now, outermost first (composition).
        self._chain: list[tuple[str, Any]] = [(pipeline_name, func)] if func is not None else []

    @contextmanager
    def composing(self, name: str, func: Any) -> Iterator[None]:
        """Mark pipeline `name` (its function `func`) as running inside the current one.

        Raises:
            PipelineDefinitionError: it is already running, so it calls itself, directly or
                through other pipelines; the message names the chain (`a -> b -> a`).
        """
        for i, (_, running) in enumerate(self._chain):
            if running is func:
                chain = " -> ".join([n for n, _ in self._chain[i:]] + [name])
                raise PipelineDefinitionError(
                    f"pipeline '{self.pipeline_name}': pipeline '{name}' calls itself "
                    f"({chain}); a pipeline cannot contain itself"
                )
        self._chain.append((name, func))
        try:
            yield
        finally:
            self._chain.pop()

    def _new_id(self, step: Step, explicit: str | None) -> str:
        if explicit is not None:
            if not isinstance(explicit, str) or not explicit:
                raise PipelineDefinitionError(
                    f"pipeline '{self.pipeline_name}': step '{step.name}' got invalid "
                    f"step_name {explicit!r}"
                )
            if explicit in self.invocations:
                raise PipelineDefinitionError(
                    f"pipeline '{self.pipeline_name}': invocation ID '{explicit}' is used twice; "
                    "give each invocation its own step_name="
                )
            return explicit
        base = step.name
        if base not in self.invocations:
            return base
        # Remember the last suffix per name so n repeats cost O(n), not O(n^2).
        k = self._next_suffix.get(base, 2)
        while f"{base}_{k}" in self.invocations:
            k += 1
        self._next_suffix[base] = k + 1
        return f"{base}_{k}"

    def add_invocation(
        self,
        step: Step,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        after: Any,
        invocation_id: str | None,
        mapping: str | None = None,
    ) -> Any:
        inv_id = self._new_id(step, invocation_id)
        where = Where(self.pipeline_name, inv_id)
        sig = step.signature
        positional = sig.positional
        if len(args) > len(positional):
            raise StepInputError(
                f"{where}: takes {len(positional)} positional argument(s) but {len(args)} "
                "were given"
            )
        arguments: dict[str, Any] = {}
        raw: dict[str, Any] = dict(zip(positional, args, strict=False))
        for key, value in kwargs.items():
            if key in raw:
                raise StepInputError(f"{where}: got multiple values for argument '{key}'")
            if key not in sig.inputs and not sig.has_var_keyword:
                close = difflib.get_close_matches(key, list(sig.inputs), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise StepInputError(f"{where}: got an unexpected argument '{key}'{hint}")
            raw[key] = value
        mapped: list[str] = []
        for key, value in raw.items():
            if mapping is not None:
                if isinstance(value, unmapped):
                    value = value.value
                elif (
                    (positional and key == positional[0] and args)
                    or isinstance(value, OutputHandle | list | tuple)
                ):
                    mapped.append(key)
            # The place is formatted only if an error needs it (most calls pass plain handles).
            arguments[key] = to_refs(value, ArgumentPlace(where, key))
        if mapping is not None and not mapped:
            raise StepInputError(f"{where}: .map()/.product() needs at least one sequence argument")
        inv = _Invocation(inv_id, step, arguments, list(_after_ids(after)), mapping, tuple(mapped))
        self.invocations[inv_id] = inv
        if mapping is not None:
            return OutputHandle(inv_id, "output")
        names = sig.output_names
        if not names:
            return OutputHandle(inv_id, None)
        if sig.multiple_outputs:
            return tuple(OutputHandle(inv_id, n) for n in names)
        return OutputHandle(inv_id, names[0])


@contextmanager
def recording(pipeline_name: str, func: Any = None) -> Iterator[Recorder]:
    """Make a new recorder current while a pipeline function (`func`, if given) runs."""
    recorder = Recorder(pipeline_name, func)
    token = _recorder.set(recorder)
    try:
        yield recorder
    finally:
        _recorder.reset(token)


def _merge_settings(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


def resolve_step_config(
    inv: _Invocation,
    pipeline_options: Mapping[str, Any],
    yaml_step: StepConfigFile | None,
    parameters: Mapping[str, Any],
    memo: dict[int, dict[str, Any]] | None = None,
) -> ResolvedStepConfig:
    """Resolve one invocation's config: YAML step block > step options > pipeline > default.

    `memo` shares the parameter-independent part between invocations of one step (a 10,000-way
    fan-out resolves it once).
    """
    if yaml_step is None and memo is not None:
        static = memo.get(id(inv.step))
        if static is None:
            static = memo[id(inv.step)] = _static_config(inv.step, pipeline_options, None)
    else:
        static = _static_config(inv.step, pipeline_options, yaml_step)
    return ResolvedStepConfig(parameters=dict(parameters), **static)


def _static_config(
    step: Step, pipeline_options: Mapping[str, Any], yaml_step: StepConfigFile | None,
) -> dict[str, Any]:
    opts = step._options
    y = yaml_step

    def pick(key: str, default: Any) -> Any:
        if y is not None and getattr(y, key, None) is not None:
            return getattr(y, key)
        if key in opts and opts[key] is not None:
            return opts[key]
        if key in pipeline_options and pipeline_options[key] is not None:
            return pipeline_options[key]
        return default

    settings = _merge_settings(
        pipeline_options.get("settings"), opts.get("settings"), y.settings if y else None
    )
    materializers = settings.pop("output_materializers", None) or {}
    if opts.get("output_materializers"):
        explicit = opts["output_materializers"]
        materializers = explicit if isinstance(explicit, Mapping) else {"*": explicit}
    elif not isinstance(materializers, Mapping):
        materializers = {"*": materializers}
    hooks = {k: opts.get(k) or pipeline_options.get(k) for k in _HOOK_KINDS}
    retry = pick("retry", None)
    if isinstance(retry, Mapping):
        with config_errors(f"step '{step.name}', option 'retry'"):
            retry = StepRetryConfig.model_validate(retry)
    timeout = (y.timeout if y and y.timeout is not None else opts.get("timeout"))
    return {
        "enable_cache": bool(pick("enable_cache", True)),
        "retry": retry,
        "hooks": {k: v for k, v in hooks.items() if v is not None},
        "timeout": timeout,
        "output_materializers": dict(materializers),
        "settings": settings,
        "step_operator": (y.step_operator if y and y.step_operator else opts.get("step_operator")),
        "experiment_tracker": (
            y.experiment_tracker if y and y.experiment_tracker else opts.get("experiment_tracker")
        ),
        "enable_artifact_metadata": bool(pick("enable_artifact_metadata", True)),
        "cache_policy": as_cache_policy(pick("cache_policy", None)),
        "pool": (y.pool if y and y.pool else opts.get("pool")),
        "log_limit": pick("log_limit", None),
    }


def compile_graph(
    pipeline_name: str,
    recorder: Recorder,
    pipeline_options: Mapping[str, Any],
    run_config: RunConfigFile | None = None,
    parameters: Mapping[str, Any] | None = None,
    outputs: Any = None,
) -> Graph:
    """Turn recorded invocations into an immutable, checked Graph.

    Raises:
        PipelineDefinitionError: an `after=` names no invocation, or there is a cycle.
        ConfigError: the YAML `steps:` block names an unknown invocation or artifact input.
        StepInputError: a required step argument is missing.
    """
    invs = recorder.invocations
    yaml_steps = run_config.steps if run_config else {}
    for sid in yaml_steps:
        if sid not in invs:
            raise ConfigError(
                f"run configuration of pipeline '{pipeline_name}': 'steps' names '{sid}', "
                f"which is no invocation; known: {', '.join(invs) or 'none'}"
            )
    enforce = env_flag("FLOWCORE_ENFORCE_TYPE_ANNOTATIONS")
    index = {sid: i for i, sid in enumerate(invs)}
    nodes: list[Node] = []
    memo: dict[int, dict[str, Any]] = {}
    for i, inv in enumerate(invs.values()):
        sig = inv.step.signature
        where = Where(pipeline_name, inv.id)
        if enforce and sig.missing_annotations:
            raise PipelineDefinitionError(
                f"{where}: FLOWCORE_ENFORCE_TYPE_ANNOTATIONS is on, but these have no type "
                f"annotation: {', '.join(repr(m) for m in sig.missing_annotations)}"
            )
        ystep = yaml_steps.get(inv.id)
        arguments = dict(inv.arguments)
        if ystep is not None:
            for key, value in ystep.parameters.items():
                if key not in sig.inputs and not sig.has_var_keyword:
                    raise ConfigError(
                        f"run configuration: {where} has no parameter '{key}'"
                    )
                if contains_ref(arguments.get(key)):
                    raise ConfigError(
                        f"run configuration: {where}, parameter '{key}' is an artifact input "
                        "and cannot be set in the configuration"
                    )
                arguments[key] = value
        for name in sig.required:
            if name not in arguments:
                raise StepInputError(f"{where}: missing required argument '{name}'")
        data_parents: set[int] = set()
        constants: dict[str, Any] = {}
        direct: list[tuple[str, OutputRef]] = []
        nested: list[tuple[str, Any]] = []
        for key, value in arguments.items():
            if isinstance(value, OutputRef):
                direct.append((key, value))
            elif contains_ref(value):
                nested.append((key, value))
            else:
                constants[key] = value
                continue
            for ref in iter_refs(value):
                data_parents.add(index[ref.node_id])
        parents = set(data_parents)
        for aid in inv.after_ids:
            if aid not in index:
                close = difflib.get_close_matches(aid, list(invs), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise PipelineDefinitionError(
                    f"step '{inv.id}' has after='{aid}', which is no invocation in pipeline "
                    f"'{pipeline_name}'{hint}"
                )
            if aid == inv.id:
                raise PipelineDefinitionError(f"{where}: a step cannot run after itself")
            parents.add(index[aid])
        step_params = dict(constants)
        if sig.defaults:
            for name, default in sig.defaults.items():
                if name not in arguments:
                    step_params[name] = default
        config = resolve_step_config(inv, pipeline_options, ystep, step_params, memo)
        nodes.append(
            Node(
                id=inv.id,
                index=i,
                step=inv.step,
                config=config,
                arguments=arguments,
                parents=tuple(sorted(parents)),
                data_parents=tuple(sorted(data_parents)),
                map_spec=MapSpec(inv.mapped, inv.mapping == "product") if inv.mapping else None,
                constants=constants,
                direct_refs=tuple(direct),
                nested_refs=tuple(nested),
            )
        )
    _check_pipeline_ignore(pipeline_name, pipeline_options, nodes)
    return Graph(pipeline_name, nodes, parameters, outputs)


def _check_pipeline_ignore(pipeline_name: str, options: Mapping[str, Any], nodes: list[Node]) -> None:
    """Raise ConfigError if a pipeline-level `cache_policy.ignore` names no step's input."""
    policy = as_cache_policy(options.get("cache_policy"))
    sigs = [node.step.signature for node in nodes]
    if policy is None or any(sig.has_var_keyword for sig in sigs):
        return
    for name in policy.ignore:
        if not any(name in sig.inputs for sig in sigs):
            raise ConfigError(f"pipeline '{pipeline_name}': option 'cache_policy' ignores "
                              f"{name!r}, which is no input or parameter of any of its steps")
