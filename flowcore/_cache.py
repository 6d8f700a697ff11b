"""Cache keys: a sha256 over named components, each the digest of one thing a step's outputs
depend on (API.md section 6).

- the step's code (`_code_identity`): its source and bytecode, closure values, default
  arguments, an instance's state, the helpers, classes and module-level values it reaches in
  the user's own modules, and the versions of the installed packages it uses;
- each parameter in canonical form, each input's content hash and type, a mapped element;
- its output names and materializers, and the settings that can change its outputs;
- a `CachePolicy`'s `depends_on` functions, modules and files (minus its `ignore` names).

The step run keeps the components (`StepRun.cache_components`), so a miss can say which one
changed since the newest earlier run of the same invocation. A value that cannot be reduced
to content makes the invocation uncacheable (never a false hit).
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import math
import os
import types
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowcore._canonical import canonical
from flowcore._clock import utcnow
from flowcore._code_identity import code_components, digest_of, value_form
from flowcore._graph import Node
from flowcore._models import StepRun
from flowcore._threads import run_in_worker_thread
from flowcore.exceptions import CacheKeyError
from flowcore.stores._base import MetadataStore

__all__ = ["CACHE_KEY_VERSION", "CacheKeyError", "CacheLookup", "cache_components", "canonical",
           "compute_cache_key", "lookup_cache"]

# 2: the key is a digest of named components and covers closures, helpers, module-level
# values, instance state, package versions and CachePolicy.depends_on.
CACHE_KEY_VERSION = "2"

# Settings keys that choose where or how a step runs, not what it computes.
_NON_OUTPUT_SETTINGS = frozenset({"orchestrator", "step_operator", "experiment_tracker",
                                  "docker", "resources"})

# node.static_digest -> the node's static components; bounded, since nodes come and go.
_STATIC: dict[str, dict[str, str]] = {}
_STATIC_LIMIT = 100_000
# The static components' items, in order -> (their digest, the dict): see _static_components.
_BY_CONTENT: dict[tuple[tuple[str, str], ...], tuple[str, dict[str, str]]] = {}


_EMPTY = digest_of({})
_code_of_step: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


# What `json.dumps(form, sort_keys=True, separators=(",", ":"))` does, without building a new
# encoder per call (json.dumps does, for any non-default keyword: ~1.5 us of a ~3 us call).
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode
_encode_str = json.encoder.encode_basestring_ascii


def json_text(form: Any) -> str:
    """`json.dumps(form, sort_keys=True, separators=(",", ":"))`, byte for byte; the scalars
    that most parameters are written directly (as the C encoder writes them: `int.__repr__`,
    `float.__repr__` for a finite float, the ASCII string escaper)."""
    kind = type(form)
    if kind is int:
        return int.__repr__(form)
    if kind is str:
        return _encode_str(form)
    if form is None:
        return "null"
    if kind is bool:
        return "true" if form else "false"
    if kind is float and math.isfinite(form):
        return float.__repr__(form)
    return _ENCODE(form)


def _short_digest(form: Any) -> str:
    """The JSON of a small canonical form itself (cheaper than hashing it), else its sha256."""
    text = json_text(form)
    return text if len(text) <= 64 else hashlib.sha256(text.encode()).hexdigest()


def _static_components(node: Node, materializers: Mapping[str, type[Any]]) -> dict[str, str]:
    """The components that cannot change while the graph lives (computed once per node)."""
    digest = node.static_digest
    if digest is not None:
        found = _STATIC.get(digest)
        if found is not None:
            return found
    cfg = node.config
    policy = getattr(cfg, "cache_policy", None)
    ignored = policy.ignore if policy is not None else ()
    step = node.step
    source = _code_of_step.get(step)
    if source is None:
        sig = step.signature
        source = _code_of_step[step] = digest_of([sig.source, list(sig.output_names)])
    settings = {k: v for k, v in cfg.settings.items()
                if k.split(".", 1)[0] not in _NON_OUTPUT_SETTINGS}
    mapped = node.map_spec.mapped if node.map_spec is not None else ()
    components = {
        "version": CACHE_KEY_VERSION,
        "source": source,
        "settings": digest_of(canonical(settings, "settings")) if settings else _EMPTY,
        "materializers": digest_of({k: f"{m.__module__}.{m.__qualname__}"
                                    for k, m in sorted(materializers.items())}
                                   ) if materializers else _EMPTY,
    }
    if node.map_spec is not None:
        components["map"] = digest_of([list(mapped), node.map_spec.product])
    for name, value in cfg.parameters.items():
        # A mapped argument is not a parameter of the whole node: each element's key covers
        # its own value.
        if name not in mapped and name not in ignored:
            components[f"parameter:{name}"] = _short_digest(canonical(value, name))
    # A new graph each run means new nodes, but mostly the same components: the digest (and
    # one shared dict) is found by their exact content, so only new content is hashed.
    content = tuple(components.items())
    known = _BY_CONTENT.get(content)
    if known is not None:
        digest, components = known
    else:
        digest = hashlib.sha256(repr(sorted(components.items())).encode()).hexdigest()
        if len(_BY_CONTENT) >= _STATIC_LIMIT:
            _BY_CONTENT.clear()
        _BY_CONTENT[content] = (digest, components)
    node.static_digest = digest
    if len(_STATIC) >= _STATIC_LIMIT:
        _STATIC.clear()
    _STATIC[digest] = components
    return components


def _input_component(identity: Any) -> str:
    if type(identity) is dict and len(identity) == 2 and "artifact" in identity:
        return f"{identity['artifact']}:{identity.get('type')}"
    return digest_of(identity)


def _element_components(element: Any, ignored: frozenset[str]) -> dict[str, str]:
    """A mapped element's value, one component per argument where it is a mapping."""
    if isinstance(element, dict) and set(element) == {"__dict__"}:
        pairs = element["__dict__"]
    elif isinstance(element, dict) and all(isinstance(k, str) for k in element):
        pairs = list(element.items())
    else:
        return {"element": digest_of(element)}
    return {f"element:{k}": digest_of(v) for k, v in pairs if k not in ignored}


def _components_now(
    node: Node,
    input_hashes: Mapping[str, Any],
    materializers: Mapping[str, type[Any]],
    element: Any,
    step_label: str,
) -> tuple[dict[str, str], dict[str, str], Any]:
    """`cache_components` without its one await: (static, dynamic, the policy, whose
    `depends_on` is still to be added when it has any)."""
    static = _static_components(node, materializers)
    policy = getattr(node.config, "cache_policy", None)
    ignored = policy.ignore if policy is not None else ()
    dynamic = code_components(node.step.func, step_label)
    for name, identity in input_hashes.items():
        if name not in ignored:
            dynamic[f"input:{name}"] = _input_component(identity)
    if element is not None:
        dynamic.update(_element_components(element, frozenset(ignored)))
    return static, dynamic, policy


async def cache_components(
    node: Node,
    input_hashes: Mapping[str, Any],
    materializers: Mapping[str, type[Any]],
    element: Any = None,
    *,
    label: str | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """The components of one invocation's key (see the module docstring): those fixed for the
    node (computed once, their digest in `node.static_digest`) and those of this lookup.

    Raises:
        CacheKeyError: a parameter, or a value the code reaches, has no stable content.
    """
    step_label = label or node.id
    static, dynamic, policy = _components_now(node, input_hashes, materializers, element,
                                              step_label)
    if policy is not None and policy.depends_on:
        dynamic.update(await dependency_components(policy.depends_on, step_label))
    return static, dynamic


async def dependency_components(depends_on: tuple[object, ...], step_label: str
                                ) -> dict[str, str]:
    """The components of a CachePolicy's `depends_on`: a function's code (as a helper), a
    module's source file, a file's or directory's content (hashed off the loop).

    Raises:
        CacheKeyError: a path that does not exist, or a function reaching a value with no
            stable content.
    """
    where = f"step '{step_label}'"
    out: dict[str, str] = {}
    paths: list[str] = []
    for item in depends_on:
        if isinstance(item, str | os.PathLike):
            paths.append(os.fspath(item))
        elif isinstance(item, types.ModuleType):
            file = getattr(item, "__file__", None)
            if file is None:
                out[f"depends_on:{item.__name__}"] = digest_of(value_form(item, where)[0])
            else:
                paths.append(file)
        else:
            form, reached = value_form(item, f"depends_on {item!r} of {where}")
            out.update(reached)
            name = getattr(item, "__qualname__", None) or repr(item)
            out[f"depends_on:{name}"] = digest_of(form)
    if paths:
        out.update(await run_in_worker_thread(_path_components, paths, where))
    return out


# (path, mtime_ns, size, inode) -> digest, for files too large to hash on every lookup.
_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}
_SMALL_FILE = 1 << 20


def _file_digest(path: Path) -> str:
    stat = path.stat()
    if stat.st_size <= _SMALL_FILE:
        # Small files are hashed every time: a same-size rewrite within the file system's
        # timestamp resolution must not be missed.
        return hashlib.sha256(path.read_bytes()).hexdigest()
    memo = (str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino)
    found = _FILE_DIGESTS.get(memo)
    if found is None:
        sha = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
        found = _FILE_DIGESTS[memo] = sha.hexdigest()
    return found


def _path_components(paths: list[str], where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in paths:
        path = Path(raw).absolute()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            out[f"depends_on:{raw}"] = digest_of(
                [[str(p.relative_to(path)), _file_digest(p)] for p in files])
        elif path.is_file():
            out[f"depends_on:{raw}"] = _file_digest(path)
        else:
            raise CacheKeyError(f"depends_on path '{raw}' of {where} does not exist ({path})")
    return out


# (static digest, this lookup's components in order) -> the key, for lookups that recur (a
# cached re-run): the repr and the hash cost more than finding them by exact content.
_KEYS: dict[tuple[str | None, tuple[tuple[str, str], ...]], str] = {}
_KEYS_LIMIT = 4096


def key_of(node: Node, dynamic: Mapping[str, str]) -> str:
    """The cache key: one digest over the node's static digest and this lookup's components
    (the static ones are summed up once, so a lookup hashes only a few short strings)."""
    content = (node.static_digest, tuple(dynamic.items()))
    key = _KEYS.get(content)
    if key is None:
        text = f"{node.static_digest}|{sorted(dynamic.items())!r}"
        key = hashlib.sha256(text.encode()).hexdigest()
        if len(_KEYS) >= _KEYS_LIMIT:
            _KEYS.clear()
        _KEYS[content] = key
    return key


async def compute_cache_key(
    node: Node,
    input_hashes: Mapping[str, Any],
    materializers: Mapping[str, type[Any]],
    extra: Any = None,
) -> str:
    """The cache key of one invocation given the identities of its inputs.

    Raises:
        CacheKeyError: a parameter or a value its code reaches has no stable content.
    """
    _, dynamic = await cache_components(node, input_hashes, materializers, extra)
    return key_of(node, dynamic)


class CacheLookup:
    """What the cache said about one invocation.

    `key` is None when the invocation is uncacheable; `hit` is the earlier step run whose
    outputs it may reuse (its artifacts still to be checked by the caller); `reason` says why
    there is no hit; `components` are the key's parts (also set on the step run).
    """

    # A plain class: made once per lookup, where a frozen dataclass's __init__ (one
    # object.__setattr__ per field) cost a microsecond of a cached step's few.
    __slots__ = ("components", "hit", "key", "reason", "uncacheable")

    def __init__(self, key: str | None, hit: StepRun | None, reason: str | None,
                 uncacheable: bool = False, components: dict[str, str] | None = None) -> None:
        self.key = key
        self.hit = hit
        self.reason = reason
        self.uncacheable = uncacheable
        self.components = components

    def __repr__(self) -> str:
        return (f"CacheLookup(key={self.key!r}, hit={self.hit!r}, reason={self.reason!r}, "
                f"uncacheable={self.uncacheable!r})")


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
    `element` is a mapped element's own value. Sets `step_run.cache_components`. On a miss,
    the reason names what changed since the newest earlier step run of this invocation (one
    more store query, never made on a hit).
    """
    label = step_run.name
    try:
        static, dynamic, policy = _components_now(node, input_hashes, materializers, element,
                                                  label)
        if policy is not None and policy.depends_on:
            dynamic.update(await dependency_components(policy.depends_on, label))
    except CacheKeyError as exc:
        step_run.cache_components = None
        return CacheLookup(None, None, f"uncacheable: {exc}", uncacheable=True)
    key = key_of(node, dynamic)
    components = {**static, **dynamic}
    step_run.cache_components = components
    hit = await store.find_cached(key)
    if hit is not None:
        expires = policy.expires_after_seconds if policy is not None else None
        if expires is not None and hit.end_time is not None:
            age = (utcnow() - hit.end_time).total_seconds()
            if age > expires:
                return CacheLookup(key, None, expired_reason(age, expires), components=components)
        return CacheLookup(key, hit, None, components=components)
    earlier = await store.find_latest_cache_components(step_run.pipeline_run_id, step_run.name)
    return CacheLookup(key, None, miss_reason(earlier, components, step_run.name),
                       components=components)


# -- why a cache-enabled step ran -----------------------------------------------------------

# Component prefixes in the order a miss reason names them (the code first).
_ORDER = ("version", "source", "code", "partial", "instance", "helper:", "default:", "closure:",
          "global:", "package:", "depends_on:", "parameter:", "element", "input:", "settings",
          "materializers", "map")


def _rank(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(_ORDER):
        if name.startswith(prefix):
            return i, name
    return len(_ORDER), name


def _describe(name: str, step: str, new: Mapping[str, str]) -> str:
    kind, _, rest = name.partition(":")
    last = rest.rpartition(":")[2]
    if kind in ("source", "code", "partial"):
        return f"code of step '{step}' changed"
    if kind == "version":
        return "the cache key format changed (flowcore was upgraded)"
    if kind == "instance":
        return f"state of the instance of step '{step}' changed"
    if kind == "helper":
        return f"code of helper `{last}` changed"
    if kind == "default":
        return f"default arguments of `{last}` changed" if last != "step" else (
            f"default arguments of step '{step}' changed")
    if kind == "closure":
        return f"closure value '{last}' changed"
    if kind == "global":
        return f"module-level value `{last}` changed"
    if kind == "package":
        return f"installed package `{rest}` changed (now {new.get(name, 'not used')})"
    if kind == "depends_on":
        return f"dependency `{rest}` changed"
    if kind == "parameter":
        return f"parameter '{rest}' changed"
    if kind == "input":
        return f"input '{rest}' changed"
    if kind == "element":
        return f"mapped element '{rest}' changed" if rest else "mapped element changed"
    if kind == "materializers":
        return "output materializers changed"
    if kind == "map":
        return "mapped arguments changed"
    return "settings changed"


def miss_reason(earlier: Mapping[str, str] | None, components: Mapping[str, str],
                step: str) -> str:
    """Why an invocation with these components has no hit, compared with the newest earlier
    step run of the same invocation (None: there is none)."""
    if earlier is None:
        return "no earlier step run with this cache key"
    changed = sorted((k for k in earlier.keys() | components.keys()
                      if earlier.get(k) != components.get(k)), key=_rank)
    if not changed:
        return ("the earlier step run with this cache key is no longer in the cache "
                "(cleared, or its run was deleted)")
    phrases = list(dict.fromkeys(_describe(k, step, components) for k in changed))
    more = f"; and {len(phrases) - 3} more" if len(phrases) > 3 else ""
    return "; ".join(phrases[:3]) + more


def expired_reason(age: float, expires_after: float) -> str:
    """The reason for a hit older than `expires_after`."""
    return (f"cached entry expired: it was stored {age:.1f} s ago, longer than "
            f"expires_after ({expires_after:g} s)")
