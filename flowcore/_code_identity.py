"""What a step's code is, for its cache key: the digests of its bytecode and of everything it
reaches, each one a named component ("code", "helper:mod.normalize", "global:mod.RATE",
"closure:n", "instance", "package:numpy", ...).

Two parts with different lifetimes:
- static facts of a code object (a digest of its bytecode, constants and names; the global
  names it loads; the names it only appends to) are computed once per process and memoized by
  code object, so an unchanged step never has its source re-read;
- values (closure cells, default arguments, module-level values, an instance's state) are
  canonicalised on every lookup, since they can change between runs.

Functions, classes and modules are followed into the user's own modules (not inside
site-packages, dist-packages or the standard library); an installed package counts by its
distribution name and version instead. A value that cannot be reduced to content (a socket,
a lock, a generator) raises CacheKeyError naming it: the step is then uncached, never guessed.
"""

from __future__ import annotations

import collections
import dis
import functools
import hashlib
import inspect
import json
import pickle
import textwrap
import types
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flowcore._canonical import canonical
from flowcore._code_modules import is_own_module, module_label, package_identity
from flowcore.exceptions import CacheKeyError

__all__ = ["code_components", "digest_of", "is_own_module", "value_form"]

_MAX_DEPTH = 40
# Methods of the built-in containers that return None and whose effect does not depend on the
# container's content: a name used only through them (`calls.append(x)`) is written, never
# read, so its content cannot change what the code returns.
_MUTATORS = frozenset({"append", "extend", "add", "update", "insert", "appendleft", "extendleft"})
_CONTAINERS = (list, set, dict, collections.deque)
_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF"})


# `json.dumps(form, sort_keys=True, separators=(",", ":"), default=repr)` without a new
# encoder per call (what json.dumps builds for any non-default keyword).
_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=repr).encode


def digest_of(form: Any) -> str:
    """sha256 of a JSON-able form (keys sorted, so equal forms give equal digests)."""
    return hashlib.sha256(_encode(form).encode()).hexdigest()


# -- static facts, once per code object -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CodeFacts:
    """What a code object (and the code objects nested in it) is, independent of values."""

    digest: str
    globals: tuple[str, ...]  # names it loads from its module's globals
    attributes: frozenset[str]  # attribute names it uses (followed into the user's modules)
    write_only: frozenset[str]  # global or free names only ever appended to


_facts: weakref.WeakKeyDictionary[types.CodeType, CodeFacts] = weakref.WeakKeyDictionary()
# id(code) -> (code, facts) for the code of step functions, looked up on every cache lookup:
# a plain dict costs a tenth of the weak one (which makes a weakref per lookup). The entry
# holds the code object, so its id is not reused while the entry lives; bounded.
_step_facts: dict[int, tuple[types.CodeType, CodeFacts]] = {}
_STEP_FACTS_LIMIT = 10_000


def code_facts(code: types.CodeType) -> CodeFacts:
    """The static facts of `code`, computed once per process."""
    found = _facts.get(code)
    if found is None:
        found = _facts[code] = _analyse(code)
    return found


def _step_code_facts(code: types.CodeType) -> CodeFacts:
    entry = _step_facts.get(id(code))
    if entry is not None and entry[0] is code:
        return entry[1]
    facts = code_facts(code)
    if len(_step_facts) >= _STEP_FACTS_LIMIT:
        _step_facts.clear()
    _step_facts[id(code)] = (code, facts)
    return facts


def _const_form(value: Any) -> Any:
    if isinstance(value, types.CodeType):
        return {"code": code_facts(value).digest}
    if isinstance(value, tuple):
        return {"tuple": [_const_form(v) for v in value]}
    if isinstance(value, frozenset):
        # A set literal's order depends on the hash seed; its content does not.
        return {"frozenset": sorted((_const_form(v) for v in value), key=repr)}
    if isinstance(value, float | complex | bytes):
        return {type(value).__name__: repr(value)}
    if value is Ellipsis:
        return {"ellipsis": True}
    return value  # None, bool, int, str


def _analyse(code: types.CodeType) -> CodeFacts:
    globals_: set[str] = set()
    attributes: set[str] = set()
    loads: dict[str, bool] = {}  # name -> every load so far is followed by a mutator method
    previous: dis.Instruction | None = None
    for ins in dis.get_instructions(code):
        if previous is not None and previous.opname in _LOADS:
            name = str(previous.argval)
            mutated = ins.opname in ("LOAD_METHOD", "LOAD_ATTR") and ins.argval in _MUTATORS
            loads[name] = loads.get(name, True) and mutated
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            globals_.add(str(ins.argval))
        elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM"):
            attributes.add(str(ins.argval))
        previous = ins
    if previous is not None and previous.opname in _LOADS:
        loads[str(previous.argval)] = False
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner = code_facts(const)
            globals_.update(inner.globals)
            attributes.update(inner.attributes)
            for name in inner.globals + tuple(const.co_freevars):
                if name in inner.write_only:
                    loads.setdefault(name, True)
                else:
                    loads[name] = False
    form = {
        "name": code.co_name,
        "code": code.co_code.hex(),
        "consts": [_const_form(c) for c in code.co_consts],
        "names": list(code.co_names),
        "vars": list(code.co_varnames),
        "free": list(code.co_freevars),
        "cells": list(code.co_cellvars),
        "args": [code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount],
        "flags": code.co_flags,
    }
    return CodeFacts(digest_of(form), tuple(sorted(globals_)), frozenset(attributes),
                     frozenset(n for n, only in loads.items() if only))


_class_digests: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def _class_digest(cls: type) -> str:
    """The class's source (read once per process) and the names of its bases."""
    found = _class_digests.get(cls)
    if found is None:
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            source = None
        bases = [f"{b.__module__}.{b.__qualname__}" for b in cls.__bases__]
        found = _class_digests[cls] = digest_of({"source": source, "bases": bases})
    return found


# -- values, on every lookup ------------------------------------------------------------------


class _Walk:
    """One lookup's walk over the values a step's code reaches; fills `components`."""

    def __init__(self) -> None:
        self.components: dict[str, str] = {}
        self._functions: set[int] = set()
        self._classes: set[int] = set()
        self._path: list[int] = []

    def package(self, module_name: str) -> dict[str, str]:
        dist, version = package_identity(module_name)
        if dist != "python":
            self.components[f"package:{dist}"] = version
        return {"__package__": dist}

    def function(self, fn: types.FunctionType, label: str, *, where: str) -> None:
        """Add the components of a user function: code, closure, defaults, globals."""
        if id(fn) in self._functions:
            return
        self._functions.add(id(fn))
        facts = code_facts(fn.__code__)
        self.components[label] = facts.digest
        who = "" if label == "code" else f"{fn.__qualname__}."
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False):
            try:
                value = cell.cell_contents
            except ValueError:  # not assigned yet
                continue
            if name in facts.write_only and type(value) in _CONTAINERS:
                continue
            form = self.value(value, f"closure value '{name}' of {where}")
            self.components[f"closure:{who}{name}"] = digest_of(form)
        if fn.__defaults__ or fn.__kwdefaults__:
            form = self.value([fn.__defaults__, fn.__kwdefaults__], f"default arguments of {where}")
            self.components[f"default:{who.rstrip('.') or 'step'}"] = digest_of(form)
        module = fn.__module__ or "__main__"
        self.globals(fn.__globals__, module, facts, where)

    def globals(self, namespace: dict[str, Any], module: str, facts: CodeFacts, where: str) -> None:
        builtins = namespace.get("__builtins__")
        for name in facts.globals:
            if name not in namespace:
                continue  # a builtin, or not defined yet (it would fail if run)
            value = namespace[name]
            if value is builtins or (name in facts.write_only and type(value) in _CONTAINERS):
                continue
            what = f"module-level value `{name}` of {where}"
            if isinstance(value, types.ModuleType):
                self.module(value, facts.attributes, what)
                continue
            form = self.value(value, what)
            if not _is_code(value):
                self.components[f"global:{module_label(module)}:{name}"] = digest_of(form)

    def module(self, module: types.ModuleType, attributes: Iterable[str], where: str) -> None:
        """A module the code uses: its attributes the code names, if it is the user's own."""
        if not is_own_module(module.__name__):
            self.package(module.__name__)
            return
        namespace = vars(module)
        for attr in sorted(attributes):
            if attr not in namespace or attr.startswith("__"):
                continue
            value = namespace[attr]
            if isinstance(value, types.ModuleType):
                continue  # a submodule: followed when the code names its attributes through it
            form = self.value(value, f"module-level value `{attr}` of {where}")
            if not _is_code(value):
                self.components[f"global:{module_label(module.__name__)}:{attr}"] = digest_of(form)

    def klass(self, cls: type, where: str) -> dict[str, Any]:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if not is_own_module(cls.__module__):
            return {"__class__": name, "p": self.package(cls.__module__)}
        if id(cls) not in self._classes:
            self._classes.add(id(cls))
            self.components[f"helper:{module_label(cls.__module__)}:{cls.__qualname__}"] = _class_digest(cls)
            prefix = f"{cls.__qualname__}."
            for attr, member in sorted(vars(cls).items()):
                fn = member.__func__ if isinstance(member, classmethod | staticmethod) else member
                fn = fn.fget if isinstance(fn, property) else fn
                if isinstance(fn, types.FunctionType) and fn.__qualname__.startswith(prefix):
                    self.function(fn, f"helper:{module_label(fn.__module__)}:{fn.__qualname__}",
                                  where=f"{where} (method {attr})")
        return {"__class__": name}

    def value(self, value: Any, where: str) -> Any:
        """A canonical form of `value` (functions, classes and modules by identity, their code
        added as components).

        Raises:
            CacheKeyError: the value (or something inside it) has no stable content.
        """
        kind = type(value)
        if value is None or kind is bool or kind is int or kind is str or kind is float:
            return canonical(value, where)
        if len(self._path) > _MAX_DEPTH:
            raise CacheKeyError(f"{where} is nested too deeply to be reduced to content")
        if id(value) in self._path:
            return {"__cycle__": len(self._path) - self._path.index(id(value))}
        self._path.append(id(value))
        try:
            return self._compound(value, kind, where)
        finally:
            self._path.pop()

    def _compound(self, value: Any, kind: type, where: str) -> Any:
        if kind is list:
            return [self.value(v, where) for v in value]
        if kind is tuple:
            return {"__tuple__": [self.value(v, where) for v in value]}
        if kind is dict:
            pairs = [[self.value(k, where), self.value(v, where)] for k, v in value.items()]
            return {"__dict__": sorted(pairs, key=lambda kv: json.dumps(kv[0], sort_keys=True,
                                                                         default=repr))}
        if kind is set or kind is frozenset:
            items = [self.value(v, where) for v in value]
            return {"__set__": sorted(items, key=lambda x: json.dumps(x, sort_keys=True,
                                                                      default=repr))}
        if kind is types.FunctionType:
            return self.callable_form(value, where)
        if kind is types.MethodType:
            return {"__method__": [self.value(value.__func__, where),
                                   self.value(value.__self__, f"instance of {where}")]}
        if kind is functools.partial:
            return {"__partial__": [self.value(value.func, where), self.value(value.args, where),
                                    self.value(value.keywords, where)]}
        if isinstance(value, type):
            return self.klass(value, where)
        if kind is types.ModuleType:
            if is_own_module(value.__name__):
                return {"__module__": value.__name__}
            return self.package(value.__name__)
        if isinstance(value, types.BuiltinFunctionType | types.BuiltinMethodType):
            owner = getattr(value, "__self__", None)
            if owner is not None and not isinstance(owner, types.ModuleType):
                return {"__builtin_method__": [value.__name__, self.value(owner, where)]}
            return {"__builtin__": f"{value.__module__}.{value.__qualname__}"}
        if kind.__module__ == "flowcore._step" and kind.__name__ == "Step":
            return {"__step__": self.value(value.func, where)}
        # A user class counts by its code too (a method the step calls may have changed).
        own = kind.__module__ != "builtins" and is_own_module(kind.__module__)
        of = self.klass(kind, where) if own else None
        try:
            form = canonical(value, where)
        except (CacheKeyError, RecursionError):
            return self.instance(value, kind, where)
        return form if of is None else {"__of__": of, "v": form}

    def callable_form(self, fn: types.FunctionType, where: str) -> dict[str, Any]:
        module = fn.__module__ or "__main__"
        name = f"{module}.{fn.__qualname__}"
        if not is_own_module(module):
            return {"__function__": name, "p": self.package(module)}
        self.function(fn, f"helper:{module_label(module)}:{fn.__qualname__}",
                      where=f"helper `{fn.__qualname__}` of {where}")
        return {"__function__": name}

    def instance(self, value: Any, kind: type, where: str) -> Any:
        """An object: a user class's state attribute by attribute, anything else pickled."""
        base: Any = object
        default_reduce = (kind.__reduce_ex__ is base.__reduce_ex__
                          and kind.__reduce__ is base.__reduce__
                          and getattr(kind, "__getstate__", None) is base.__getstate__)
        if default_reduce and is_own_module(kind.__module__):
            state = dict(getattr(value, "__dict__", {}))
            for slot in _slots_of(kind):
                if hasattr(value, slot):
                    state[slot] = getattr(value, slot)
            return {"__object__": self.klass(kind, where),
                    "v": self.value(state, f"{where} (a {kind.__qualname__})")}
        try:
            data = pickle.dumps(value, protocol=4)
        except Exception as exc:  # pickle raises many kinds; each one means "no content"
            raise CacheKeyError(
                f"{where} is a {kind.__qualname__}, which cannot be reduced to content ({exc})"
            ) from None
        return {"__pickle__": f"{kind.__module__}.{kind.__qualname__}",
                "sha256": hashlib.sha256(data).hexdigest()}


def _is_code(value: Any) -> bool:
    """Classes and functions count by their code (as helpers), not as module-level values."""
    return isinstance(value, type) or isinstance(value, types.FunctionType)


def _slots_of(kind: type) -> list[str]:
    slots: list[str] = []
    for klass in kind.__mro__:
        names = klass.__dict__.get("__slots__", ())
        slots.extend([names] if isinstance(names, str) else names)
    return [s for s in slots if s not in ("__dict__", "__weakref__")]


def code_components(func: Callable[..., Any], step_label: str) -> dict[str, str]:
    """The components of a step function's code: "code", "helper:...", "global:...",
    "closure:...", "default:...", "instance", "package:...".

    A bound method or a callable instance adds the instance's state ("instance").

    Raises:
        CacheKeyError: a value the code reaches cannot be reduced to content; the message
            names it ("closure value 'sock' of step 'x' is a socket, ...").
    """
    if type(func) is types.FunctionType and func.__closure__ is None and not func.__defaults__ \
            and not func.__kwdefaults__:
        facts = _step_code_facts(func.__code__)
        names = facts.globals
        if not names:
            return {"code": facts.digest}  # the common step: nothing but its own code
        namespace = func.__globals__
        for name in names:
            if name in namespace:
                break
        else:
            return {"code": facts.digest}  # only builtins (or names not defined yet)
    walk = _Walk()
    where = f"step '{step_label}'"
    target: Any = func
    if isinstance(target, functools.partial):
        walk.components["partial"] = digest_of(walk.value([target.args, target.keywords], where))
        target = target.func
    owner = None
    if isinstance(target, types.MethodType):
        owner, target = target.__self__, target.__func__
    elif not isinstance(target, types.FunctionType) and callable(target):
        owner, target = target, type(target).__call__
    if isinstance(target, types.FunctionType):
        walk.function(target, "code", where=where)
    else:
        walk.components["code"] = digest_of(walk.value(target, where))
    if owner is not None:
        form = walk.value(owner, f"the instance of {where}")
        walk.components["instance"] = digest_of(form)
    return walk.components


def value_form(value: Any, where: str) -> tuple[Any, dict[str, str]]:
    """The canonical form of any value (a `depends_on` function, a parameter that is a
    function or an object) and the code components it reaches."""
    walk = _Walk()
    form = walk.value(value, where)
    return form, walk.components
