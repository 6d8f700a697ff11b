"""Cache keys: a sha256 over what determines a step's outputs.

The key covers the step's normalized source (decorators stripped), its parameters in canonical
form, the content hashes of its input artifacts, its output materializers and the settings that
can change its outputs. A parameter that cannot be put in canonical form makes the step
uncacheable (never a false hit).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowcore._canonical import canonical
from flowcore._graph import Node
from flowcore._models import StepRun
from flowcore.exceptions import CacheKeyError
from flowcore.stores._base import MetadataStore

__all__ = ["CACHE_KEY_VERSION", "CacheKeyError", "CacheLookup", "canonical", "compute_cache_key",
           "lookup_cache"]

CACHE_KEY_VERSION = "1"

# Settings keys that choose where or how a step runs, not what it computes.
_NON_OUTPUT_SETTINGS = frozenset({"orchestrator", "step_operator", "experiment_tracker",
                                  "docker", "resources"})


def _static_digest(node: Node, materializers: Mapping[str, type[Any]]) -> str:
    if node.static_digest is not None:
        return node.static_digest
    cfg = node.config
    settings = {k: v for k, v in cfg.settings.items()
                if k.split(".", 1)[0] not in _NON_OUTPUT_SETTINGS}
    payload = {
        "v": CACHE_KEY_VERSION,
        "source": node.step.signature.source,
        "outputs": list(node.step.signature.output_names),
        # A mapped argument is not a parameter of the whole node: each element's key covers
        # its own value (see the runner's map expansion).
        "parameters": canonical(
            {k: v for k, v in cfg.parameters.items()
             if node.map_spec is None or k not in node.map_spec.mapped}, "parameters"),
        "materializers": {k: f"{m.__module__}.{m.__qualname__}"
                          for k, m in sorted(materializers.items())},
        "settings": canonical(settings, "settings"),
        "map": None if node.map_spec is None else [list(node.map_spec.mapped),
                                                   node.map_spec.product],
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    # Kept on the node, so it lives exactly as long as the graph (no process-wide memo).
    node.static_digest = digest
    return digest


def compute_cache_key(
    node: Node,
    input_hashes: Mapping[str, Any],
    materializers: Mapping[str, type[Any]],
    extra: Any = None,
) -> str:
    """The cache key of one invocation given the content hashes of its inputs.

    Raises:
        CacheKeyError: a parameter has no stable canonical form.
    """
    static = _static_digest(node, materializers)
    if not input_hashes and extra is None:
        return static
    payload = json.dumps(
        {"static": static, "inputs": input_hashes, "extra": canonical(extra, "element")},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """What the cache said about one invocation.

    `key` is None when the invocation is uncacheable; `hit` is the earlier step run whose
    outputs it may reuse (its artifacts still to be checked by the caller); `reason` says why
    there is no hit.
    """

    key: str | None
    hit: StepRun | None
    reason: str | None
    uncacheable: bool = False


async def lookup_cache(
    store: MetadataStore,
    node: Node,
    step_run: StepRun,
    input_hashes: Mapping[str, Any],
    materializers: Mapping[str, type[Any]],
    element: Any = None,
) -> CacheLookup:
    """Compute the invocation's key and look it up in the metadata store.

    `input_hashes` maps each input to its identity (content hash and type of its artifact);
    `element` is a mapped element's own value.
    """
    try:
        key = compute_cache_key(node, input_hashes, materializers, element)
    except CacheKeyError as exc:
        return CacheLookup(None, None, f"uncacheable: {exc}", uncacheable=True)
    hit = await store.find_cached(key)
    if hit is None:
        return CacheLookup(key, None, "no earlier step run with this cache key")
    return CacheLookup(key, hit, None)
