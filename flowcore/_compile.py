"""Compiling recorded invocations (see `_recording`) to a checked, immutable Graph."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowcore._arguments import Where
from flowcore._compile_static import (
    Head,
    StaticConfig,
    Tail,
    pipeline_key,
    resolve_static,
    static_config,
)
from flowcore._graph import Graph, Node, OutputRef, contains_ref, iter_refs
from flowcore._recording import Recorder, current_recorder, recording
from flowcore._signature import StepSignature
from flowcore.config import (
    CachePolicy,
    RunConfigFile,
    StepConfigFile,
    StepRetryConfig,
    as_cache_policy,
    env_flag,
)
from flowcore.exceptions import ConfigError, PipelineDefinitionError, StepInputError

__all__ = ["Recorder", "ResolvedStepConfig", "compile_graph", "current_recorder", "recording"]


@dataclass(slots=True)
class ResolvedStepConfig:
    """One invocation's configuration after step > YAML > pipeline > default resolution.

    Invocations of one step share every field but `parameters` (the same objects: the run
    plan binds a step's hooks and settings once for all of them).
    """

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


class _StepFacts:
    """What the compile needs of one step, looked up once per compile (not per invocation)."""

    __slots__ = ("defaults", "head", "key", "required", "sig", "tail")

    def __init__(self, sig: StepSignature, key: Any) -> None:
        self.sig = sig
        self.required = sig.required
        self.defaults = tuple(sig.defaults.items()) if sig.defaults else ()
        self.head: Head | None = None  # the static config (without YAML), on use
        self.tail: Tail = (True, None, None, None)
        self.key = key  # the compile's pipeline_key, shared by its steps


def _params(facts: _StepFacts, constants: Mapping[str, Any], arguments: Mapping[str, Any],
            ) -> dict[str, Any]:
    """The invocation's parameters: its constant arguments, then the defaults it left out."""
    params = dict(constants)
    for name, default in facts.defaults:
        if name not in arguments:
            params[name] = default
    return params


def _check_after(node: Node, aid: str, index: Mapping[str, int], pipeline_name: str) -> int:
    if aid not in index:
        close = difflib.get_close_matches(aid, list(index), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise PipelineDefinitionError(
            f"step '{node.id}' has after='{aid}', which is no invocation in pipeline "
            f"'{pipeline_name}'{hint}"
        )
    if aid == node.id:
        raise PipelineDefinitionError(
            f"{Where(pipeline_name, node.id)}: a step cannot run after itself")
    return index[aid]


def _late_node(
    node: Node, facts: _StepFacts, recorder: Recorder, pipeline_name: str,
    pipeline_options: Mapping[str, Any], ystep: StepConfigFile | None,
) -> Node:
    """A node the fast path cannot finish: YAML sets its parameters or config, or an argument
    refers to an invocation by an ID not recorded before it. Splits its arguments again."""
    sig = facts.sig
    index = recorder._index
    where = Where(pipeline_name, node.id)
    arguments = dict(node.arguments)
    if ystep is not None:
        for key, value in ystep.parameters.items():
            if key not in sig.inputs and not sig.has_var_keyword:
                raise ConfigError(f"run configuration: {where} has no parameter '{key}'")
            if contains_ref(arguments.get(key)):
                raise ConfigError(
                    f"run configuration: {where}, parameter '{key}' is an artifact input "
                    "and cannot be set in the configuration"
                )
            arguments[key] = value
    for name in facts.required:
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
            position = index.get(ref.node_id)
            if position is None:
                raise PipelineDefinitionError(
                    f"{where}: argument '{key}' is the output of invocation '{ref.node_id}', "
                    f"which is no invocation in pipeline '{pipeline_name}'"
                )
            data_parents.add(position)
    parents = set(data_parents)
    for aid in recorder.after.get(node.index, ()):
        parents.add(_check_after(node, aid, index, pipeline_name))
    params = _params(facts, constants, arguments)
    if ystep is None:
        head, tail = _static_of(facts, node.step, pipeline_options)
    else:
        head, tail = resolve_static(node.step, pipeline_options, ystep)
    return Node(
        node.id, node.index, node.step, ResolvedStepConfig(*head, params, *tail), arguments,
        tuple(sorted(parents)), tuple(sorted(data_parents)), node.map_spec,
        constants, tuple(direct), tuple(nested),
    )


def _static_of(facts: _StepFacts, step: Any, pipeline_options: Mapping[str, Any],
               ) -> StaticConfig:
    if facts.head is None:
        facts.head, facts.tail = static_config(step, pipeline_options, facts.key)
    return facts.head, facts.tail


def compile_graph(
    pipeline_name: str,
    recorder: Recorder,
    pipeline_options: Mapping[str, Any],
    run_config: RunConfigFile | None = None,
    parameters: Mapping[str, Any] | None = None,
    outputs: Any = None,
) -> Graph:
    """Turn recorded invocations into an immutable, checked Graph.

    The recorder's nodes are finished in place (their config, `after=` edges), so a recorder
    is compiled once.

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
    index = recorder._index
    after = recorder.after
    late = recorder.late
    nodes = list(invs.values())
    # Per step, by identity: a 10,000-way fan-out of one step looks it up once.
    facts_of: dict[int, _StepFacts] = {}
    key = pipeline_key(pipeline_options)
    slow = bool(yaml_steps) or bool(late)
    last_step: Any = None
    facts: Any = None
    for node in nodes:
        step = node.step
        if step is not last_step:
            facts = facts_of.get(id(step))
            if facts is None:
                sig = step.signature
                if enforce and sig.missing_annotations:
                    raise PipelineDefinitionError(
                        f"{Where(pipeline_name, node.id)}: FLOWCORE_ENFORCE_TYPE_ANNOTATIONS is "
                        "on, but these have no type annotation: "
                        f"{', '.join(repr(m) for m in sig.missing_annotations)}"
                    )
                facts = facts_of[id(step)] = _StepFacts(sig, key)
            last_step = step
        if slow:
            ystep = yaml_steps.get(node.id)
            if ystep is not None or node.index in late:
                done = _late_node(node, facts, recorder, pipeline_name, pipeline_options, ystep)
                nodes[node.index] = invs[node.id] = done
                continue
        arguments = node.arguments
        for name in facts.required:
            if name not in arguments:
                raise StepInputError(
                    f"{Where(pipeline_name, node.id)}: missing required argument '{name}'")
        if after and node.index in after:
            edges = {_check_after(node, aid, index, pipeline_name) for aid in after[node.index]}
            node.parents = tuple(sorted(edges.union(node.data_parents)))
        head: Head | None = facts.head
        if head is None:
            head, _ = _static_of(facts, step, pipeline_options)
        tail: Tail = facts.tail
        node.config = ResolvedStepConfig(
            *head,
            _params(facts, node.constants, arguments) if facts.defaults else dict(node.constants),
            *tail,
        )
    _check_pipeline_ignore(pipeline_name, pipeline_options, nodes)
    return Graph(pipeline_name, nodes, parameters, outputs, by_id=invs)


def _check_pipeline_ignore(pipeline_name: str, options: Mapping[str, Any], nodes: list[Node]) -> None:
    """Raise ConfigError if a pipeline-level `cache_policy.ignore` names no step's input."""
    value = options.get("cache_policy")
    if value is None:
        return
    policy = as_cache_policy(value)
    if policy is None:
        return
    sigs = [node.step.signature for node in nodes]
    if any(sig.has_var_keyword for sig in sigs):
        return
    for name in policy.ignore:
        if not any(name in sig.inputs for sig in sigs):
            raise ConfigError(f"pipeline '{pipeline_name}': option 'cache_policy' ignores "
                              f"{name!r}, which is no input or parameter of any of its steps")
