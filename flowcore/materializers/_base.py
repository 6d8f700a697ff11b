"""The Materializer base class, its type registry and the name <-> type look-ups."""

from __future__ import annotations

import importlib
import typing
from typing import Any, ClassVar

from flowcore.exceptions import MaterializerError

__all__ = [
    "Materializer",
    "is_builtin_materializer",
    "is_known_type",
    "materializer_for",
    "remember_type",
    "resolve_materializer",
    "type_from_name",
]

# data type -> materializer class. A later registration replaces an earlier one, except that
# a lazily imported built-in (numpy, pydantic) never replaces what a user registered first.
_REGISTRY: dict[type, type[Materializer]] = {}
# materializer_for() answers by type, cleared whenever a materializer registers.
_FOUND: dict[Any, type[Materializer]] = {}

# Built-ins for third-party types, keyed by the "module.qualname" of a class in a data type's
# MRO, so flowcore can tell a numpy array apart without importing numpy itself.
_LAZY_BUILTINS: dict[str, str] = {
    "numpy.ndarray": "flowcore.materializers._numpy",
    "numpy.generic": "flowcore.materializers._numpy",
    "pydantic.main.BaseModel": "flowcore.materializers._pydantic",
}

# "module.qualname" -> type, for every data type and materializer seen in this process, so a
# class defined in a function body can still be loaded back by name in the same process.
# `type(None)` cannot be imported by name (there is no `builtins.NoneType`), so seed it.
_TYPES: dict[str, type] = {"builtins.NoneType": type(None)}


class Materializer:
    """Writes one kind of value into an artifact directory and reads it back.

    Subclasses list the types they handle in `ASSOCIATED_TYPES` and register themselves for
    them when the class is created; the registration nearest in a data type's MRO is used.
    Both methods are synchronous: flowcore calls them off the event loop.

    Attributes:
        ASSOCIATED_TYPES: the types this materializer is registered for.
    """

    ASSOCIATED_TYPES: ClassVar[tuple[type, ...]] = ()
    _flowcore_builtin: ClassVar[bool] = False

    def __init_subclass__(cls, *, builtin: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Set on every subclass so a user's subclass of a built-in is not itself a built-in.
        cls._flowcore_builtin = builtin
        remember_type(cls)
        for data_type in cls.ASSOCIATED_TYPES:
            if builtin:
                _REGISTRY.setdefault(data_type, cls)
            else:
                _REGISTRY[data_type] = cls
                _FOUND.clear()

    def save(self, data: Any, uri: str) -> None:
        """Write `data` into the directory `uri` (it exists and is empty when called).

        Args:
            data: the value to store.
            uri: a local directory this materializer owns for the artifact.
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not implement save()")

    @classmethod
    def files_for(cls, data: Any) -> dict[str, bytes] | None:
        """The exact files `save` would write for `data` (name -> bytes), or None.

        Optional: a materializer that can answer without I/O lets the artifact store hash
        small values in memory and skip writing content it already has.
        """
        return None

    def load(self, data_type: type, uri: str) -> Any:
        """Read back the value `save` wrote into `uri`.

        Args:
            data_type: the type the value was stored as (`object` when it is unknown).
            uri: the artifact directory.
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not implement load()")


def is_builtin_materializer(materializer: type[Materializer]) -> bool:
    """Whether `materializer` ships with flowcore (a failing built-in falls back to cloudpickle)."""
    return materializer._flowcore_builtin


def _as_class(data_type: Any) -> type | None:
    if data_type is None:
        return type(None)
    if isinstance(data_type, type):
        return data_type
    origin = typing.get_origin(data_type)  # list[int] -> list
    return origin if isinstance(origin, type) else None


def materializer_for(data_type: Any) -> type[Materializer]:
    """Return the materializer registered nearest in `data_type`'s MRO.

    Dataclasses without a registered materializer get the dataclass one; anything else (or a
    typing construct that is no class) gets `CloudpickleMaterializer`.
    """
    try:
        return _FOUND[data_type]
    except (KeyError, TypeError):
        pass
    found = _lookup(data_type)
    try:
        _FOUND[data_type] = found
    except TypeError:  # an unhashable typing construct
        pass
    return found


def _lookup(data_type: Any) -> type[Materializer]:
    from flowcore.materializers import _builtin, _cloudpickle

    cls = _as_class(data_type)
    if cls is None:
        return _cloudpickle.CloudpickleMaterializer
    for klass in cls.__mro__:
        found = _REGISTRY.get(klass)
        if found is None:
            lazy = _LAZY_BUILTINS.get(f"{klass.__module__}.{klass.__qualname__}")
            if lazy is not None:
                importlib.import_module(lazy)  # registers its materializer on import
                found = _REGISTRY.get(klass)
        if found is not None:
            return found
    if _builtin.is_dataclass_type(cls):
        return _builtin.DataclassMaterializer
    return _cloudpickle.CloudpickleMaterializer


def remember_type(data_type: Any) -> str:
    """Return `data_type`'s "module.qualname" and remember it so `type_from_name` finds it."""
    cls = _as_class(data_type)
    if cls is None:
        return "builtins.object"
    name = f"{cls.__module__}.{cls.__qualname__}"
    _TYPES[name] = cls
    return name


def _import_object(path: str) -> Any:
    """Import "pkg.mod.Attr.Nested": the longest importable module prefix, then attributes."""
    parts = path.split(".")
    if len(parts) < 2 or not all(parts):
        raise ImportError(f"'{path}' is not an import path of the form 'package.module.Class'")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only "this prefix is no module" moves on to a shorter prefix; a module that
            # exists but fails to import is a real error.
            missing = exc.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                continue
            raise
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module found for '{path}'")


def is_known_type(name: str) -> bool:
    """Whether `type_from_name(name)` is answered from memory (no import)."""
    return name in _TYPES


def type_from_name(name: str) -> type | None:
    """Return the type called `name` ("module.qualname"): one seen in this process, else imported.

    Returns None when it cannot be found (e.g. a class local to a function of another process).
    """
    known = _TYPES.get(name)
    if known is not None:
        return known
    if "<locals>" in name:
        return None
    try:
        obj = _import_object(name)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def resolve_materializer(spec: type | str, *, where: str) -> type[Materializer]:
    """Turn a materializer class or its import path ("pkg.mod.Class") into the class.

    Args:
        spec: the class, or its import path.
        where: what asked for it, for the error message, e.g. "pipeline 'p', step 's',
            output 'o'".

    Raises:
        MaterializerError: the path does not import, or names no Materializer subclass.
    """
    obj: Any = spec
    if isinstance(spec, str):
        obj = _TYPES.get(spec)
        if obj is None:
            try:
                obj = _import_object(spec)
            except Exception as exc:
                raise MaterializerError(
                    f"{where}: cannot import materializer '{spec}' ({exc}); give a class or "
                    "a full import path such as 'my_package.materializers.MyMaterializer'"
                ) from exc
    if not (isinstance(obj, type) and issubclass(obj, Materializer)):
        raise MaterializerError(
            f"{where}: {spec!r} is not a flowcore Materializer; subclass "
            "flowcore.Materializer and implement save() and load()"
        )
    return obj
