"""A step's static configuration: what step > YAML > pipeline > default resolution gives for
it whatever its parameters, shared by all its invocations and reused across runs.

Reuse across runs is keyed on the step object (its cache is emptied by `configure()`; a
`with_options()` copy starts empty) and on the identity of the pipeline option values it
reads, and is taken only if a snapshot of every container among those values and the step's
options (a settings dict, a retry or cache-policy mapping) still matches strictly (1, 1.0 and
True differ), so an option mutated in place after a run is seen by the next one. Values that
are not containers (hooks, classes, frozen configs, scalars) need no more than identity: the
resolution passes them on or reads what cannot change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowcore._step import Step
from flowcore.config import (
    CachePolicy,
    StepConfigFile,
    StepRetryConfig,
    as_cache_policy,
    config_errors,
)

__all__ = ["HOOK_KINDS", "Head", "StaticConfig", "Tail", "merge_settings", "pipeline_key", "resolve_static",
           "static_config"]

HOOK_KINDS = ("on_start", "on_success", "on_failure", "on_end")
# The pipeline options the resolution reads.
_PIPELINE_KEYS = ("settings", "retry", "enable_cache", "enable_artifact_metadata", "cache_policy",
                  "log_limit", *HOOK_KINDS)
_SCALARS = frozenset({str, int, float, bool, bytes, type(None), complex})
_UNCOPYABLE = object()
# Resolutions kept per step (one per distinct set of pipeline options seen lately).
_PER_STEP = 8

# (enable_cache, retry, hooks, timeout, output_materializers, settings, step_operator,
#  experiment_tracker), (enable_artifact_metadata, cache_policy, pool, log_limit): the fields
# of ResolvedStepConfig before and after `parameters`, so a node's config is built positionally.
Head = tuple[bool, StepRetryConfig | None, dict[str, Any], float | None, dict[str, Any],
             dict[str, Any], str | None, str | None]
Tail = tuple[bool, CachePolicy | None, str | None, int | None]
StaticConfig = tuple[Head, Tail]


def merge_settings(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


def resolve_static(
    step: Step, pipeline_options: Mapping[str, Any], yaml_step: StepConfigFile | None,
) -> StaticConfig:
    """Resolve a step's static configuration afresh."""
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

    settings = merge_settings(
        pipeline_options.get("settings"), opts.get("settings"), y.settings if y else None
    )
    materializers = settings.pop("output_materializers", None) or {}
    if opts.get("output_materializers"):
        explicit = opts["output_materializers"]
        materializers = explicit if isinstance(explicit, Mapping) else {"*": explicit}
    elif not isinstance(materializers, Mapping):
        materializers = {"*": materializers}
    hooks = {k: opts.get(k) or pipeline_options.get(k) for k in HOOK_KINDS}
    retry = pick("retry", None)
    if isinstance(retry, Mapping):
        with config_errors(f"step '{step.name}', option 'retry'"):
            retry = StepRetryConfig.model_validate(retry)
    timeout = (y.timeout if y and y.timeout is not None else opts.get("timeout"))
    head: Head = (
        bool(pick("enable_cache", True)),
        retry,
        {k: v for k, v in hooks.items() if v is not None},
        timeout,
        dict(materializers),
        settings,
        (y.step_operator if y and y.step_operator else opts.get("step_operator")),
        (y.experiment_tracker if y and y.experiment_tracker else opts.get("experiment_tracker")),
    )
    tail: Tail = (
        bool(pick("enable_artifact_metadata", True)),
        as_cache_policy(pick("cache_policy", None)),
        (y.pool if y and y.pool else opts.get("pool")),
        pick("log_limit", None),
    )
    return head, tail


def _snapshot(value: Any) -> Any:
    """A copy of every container inside `value` (other values as they are), or _UNCOPYABLE
    for a container this module cannot compare (a set, a non-dict mapping)."""
    kind = type(value)
    if kind is dict:
        out = {}
        for k, v in value.items():
            if type(k) not in _SCALARS:
                return _UNCOPYABLE
            copied = _snapshot(v)
            if copied is _UNCOPYABLE:
                return _UNCOPYABLE
            out[k] = copied
        return out
    if kind is list or kind is tuple:
        items = [_snapshot(v) for v in value]
        if any(v is _UNCOPYABLE for v in items):
            return _UNCOPYABLE
        return items if kind is list else tuple(items)
    if isinstance(value, Mapping | set | frozenset | list | tuple | dict):
        return _UNCOPYABLE
    return value


def _same(snap: Any, value: Any) -> bool:
    """Whether `value` still equals its snapshot: same types, same scalars, same objects."""
    if snap is value:
        return True  # a scalar or an object kept as it is (a container's snapshot is a copy)
    kind = type(snap)
    if kind is not type(value):
        return False
    if kind in _SCALARS:
        return bool(snap == value)
    if kind is dict:
        if len(snap) != len(value):
            return False
        for (ks, vs), (kv, vv) in zip(snap.items(), value.items(), strict=True):
            if type(ks) is not type(kv) or ks != kv or not (vs is vv or _same(vs, vv)):
                return False
        return True
    if kind is list or kind is tuple:
        if len(snap) != len(value):
            return False
        for a, b in zip(snap, value, strict=True):
            if a is not b and not _same(a, b):
                return False
        return True
    return False


def pipeline_key(pipeline_options: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[Any, ...]]:
    """(the ids of the pipeline option values a step's resolution reads, those values):
    computed once per compile, shared by its steps."""
    values = tuple(map(pipeline_options.get, _PIPELINE_KEYS))
    return tuple(map(id, values)), values


def _checks(values: Any) -> list[tuple[Any, Any]] | None:
    """(container, its snapshot) for each container among `values`; None if one of them
    cannot be compared (then nothing is cached)."""
    out = []
    for value in values:
        if type(value) in _SCALARS or not isinstance(
                value, Mapping | list | tuple | set | frozenset):
            continue
        snap = _snapshot(value)
        if snap is _UNCOPYABLE:
            return None
        out.append((value, snap))
    return out


def static_config(
    step: Step, pipeline_options: Mapping[str, Any],
    key: tuple[tuple[int, ...], tuple[Any, ...]] | None = None,
) -> StaticConfig:
    """A step's static configuration without a YAML step block, reused across runs while
    neither the step's options nor the pipeline options it reads changed.

    `key` is `pipeline_key(pipeline_options)`, if the caller has it already.
    """
    ids, values = key or pipeline_key(pipeline_options)
    cache = step._resolved
    entry = cache.get(ids)
    if entry is not None:
        _, checks, found = entry
        # The entry holds the values themselves, so an equal id is the same object; only a
        # container changed in place can make it stale.
        for obj, snap in checks:
            if not _same(snap, obj):
                break
        else:
            return found  # type: ignore[no-any-return]
    found = resolve_static(step, pipeline_options, None)
    pipeline_checks = _checks(values)
    step_checks = _checks(step._options.values())
    if pipeline_checks is not None and step_checks is not None:
        if len(cache) >= _PER_STEP:
            cache.clear()
        cache[ids] = (values, pipeline_checks + step_checks, found)
    return found
