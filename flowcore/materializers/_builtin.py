"""Built-in materializers for plain values: JSON where it round-trips exactly, else a fallback.

Each built-in refuses (raises) a value it cannot store *exactly* — a dict with int keys, a
tuple nested in a list, an `IntEnum` — so the artifact store falls back to cloudpickle
instead of handing back a different value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, TypeGuard

from flowcore.exceptions import MaterializerError
from flowcore.materializers._base import Materializer
from flowcore.materializers._json import dumps_pieces, dumps_text, loads_text

__all__ = [
    "BuiltInContainerMaterializer",
    "BuiltInMaterializer",
    "BytesMaterializer",
    "DataclassMaterializer",
    "PathMaterializer",
    "is_dataclass_type",
    "is_json_exact",
]

_JSON_FILE = "data.json"
_PRIMITIVES: tuple[type, ...] = (type(None), bool, int, float, str)


def is_json_exact(value: Any) -> bool:
    """Whether `json.loads(json.dumps(value))` gives back an equal value of the same types."""
    try:
        return _json_exact(value)
    except RecursionError:
        return False


def _json_exact(value: Any) -> bool:
    kind = type(value)
    if kind in _PRIMITIVES:
        return True
    if kind is list:
        return all(_json_exact(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _json_exact(v) for k, v in value.items())
    return False


def _json_parts(payload: Any) -> list[bytes]:
    """`json.dumps(payload, ensure_ascii=False)` as UTF-8, in bounded pieces (see _json)."""
    if type(payload) in _PRIMITIVES:  # one piece: no generator, no encoder
        text = dumps_text(payload, ensure_ascii=False)
        try:
            return [text.encode("utf-8")]
        except UnicodeEncodeError:
            return [dumps_text(payload).encode("ascii")]  # see below
    try:
        return [p.encode("utf-8") for p in dumps_pieces(payload, ensure_ascii=False)]
    except UnicodeEncodeError:
        # A lone surrogate (a str decoded with surrogateescape) has no UTF-8 form; JSON's
        # \uXXXX escapes keep it, valid and exact on the way back.
        return [p.encode("ascii") for p in dumps_pieces(payload)]


def _json_bytes(payload: Any) -> bytes:
    return b"".join(_json_parts(payload))


def _write_json(uri: str, payload: Any) -> None:
    # The same bytes as files_for() gives, so both paths produce one content hash.
    with open(os.path.join(uri, _JSON_FILE), "wb") as f:
        f.writelines(_json_parts(payload))


def _read_json(uri: str) -> Any:
    with open(os.path.join(uri, _JSON_FILE), "rb") as f:
        data = f.read()
    # json.load would decode a large document in one GIL-holding call; loads_text does not.
    return loads_text(data.decode("utf-8"))


def _refuse(data: Any, why: str) -> MaterializerError:
    return MaterializerError(f"cannot store a value of type {type(data).__qualname__}: {why}")


class BuiltInMaterializer(Materializer, builtin=True):
    """None, bool, int, float and str, as a JSON document."""

    ASSOCIATED_TYPES = _PRIMITIVES

    def save(self, data: Any, uri: str) -> None:
        if type(data) not in _PRIMITIVES:  # a subclass (IntEnum, numpy.str_) would come back
            raise _refuse(data, "only exact None/bool/int/float/str")  # as its base type
        _write_json(uri, data)

    @classmethod
    def files_for(cls, data: Any) -> dict[str, bytes] | None:
        if type(data) not in _PRIMITIVES:
            return None
        return {_JSON_FILE: _json_bytes(data)}

    @classmethod
    def from_files(cls, files: dict[str, bytes], data_type: type) -> Any:
        """What `load` gives for a directory holding exactly `files` (an inline artifact)."""
        return loads_text(files[_JSON_FILE].decode("utf-8"))

    def load(self, data_type: type, uri: str) -> Any:
        return _read_json(uri)


class BytesMaterializer(Materializer, builtin=True):
    """bytes, as a raw file."""

    ASSOCIATED_TYPES = (bytes,)

    def save(self, data: Any, uri: str) -> None:
        if type(data) is not bytes:
            raise _refuse(data, "only exact bytes")
        with open(os.path.join(uri, "data.bin"), "wb") as f:
            f.write(data)

    def load(self, data_type: type, uri: str) -> Any:
        with open(os.path.join(uri, "data.bin"), "rb") as f:
            return f.read()


_CONTAINERS: dict[str, type[Any]] = {
    "list": list, "dict": dict, "tuple": tuple, "set": set, "frozenset": frozenset,
}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class BuiltInContainerMaterializer(Materializer, builtin=True):
    """list, dict, tuple, set and frozenset of JSON values, as a JSON document.

    The container's own kind is stored, so a tuple or a set comes back as one. Set elements
    are written in a canonical order so that equal sets give equal content hashes.
    """

    ASSOCIATED_TYPES = tuple(_CONTAINERS.values())

    def save(self, data: Any, uri: str) -> None:
        _write_json(uri, self._document(data))

    @classmethod
    def files_for(cls, data: Any) -> dict[str, bytes] | None:
        try:
            return {_JSON_FILE: _json_bytes(cls._document(data))}
        except MaterializerError:
            return None

    @staticmethod
    def _document(data: Any) -> dict[str, Any]:
        kind = type(data).__name__
        if _CONTAINERS.get(kind) is not type(data):
            raise _refuse(data, "only exact list/dict/tuple/set/frozenset")
        items: Any = data if kind in ("list", "dict") else list(data)
        if not is_json_exact(items):
            raise _refuse(data, "it holds values JSON cannot give back exactly")
        if kind in ("set", "frozenset"):
            items = sorted(items, key=_canonical)
        return {"kind": kind, "value": items}

    @classmethod
    def from_files(cls, files: dict[str, bytes], data_type: type) -> Any:
        """What `load` gives for a directory holding exactly `files` (an inline artifact)."""
        doc = loads_text(files[_JSON_FILE].decode("utf-8"))
        return _CONTAINERS[doc["kind"]](doc["value"])

    def load(self, data_type: type, uri: str) -> Any:
        doc = _read_json(uri)
        return _CONTAINERS[doc["kind"]](doc["value"])


def is_dataclass_type(cls: type) -> TypeGuard[type[Any]]:
    """Whether `cls` is a dataclass (the class, not an instance)."""
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def _has_init_vars(cls: type) -> bool:
    # InitVar pseudo-fields are absent from fields() and from the instance, so the rebuild
    # `cls(**fields)` could not pass them; such dataclasses are pickled instead.
    all_fields = getattr(cls, "__dataclass_fields__", {}).values()
    return any(str(getattr(f, "_field_type", "")) == "_FIELD_INITVAR" for f in all_fields)


class DataclassMaterializer(Materializer, builtin=True):
    """A dataclass whose init fields are JSON values, rebuilt with `data_type(**fields)`.

    Chosen by `materializer_for` for any dataclass without a registered materializer.
    """

    def save(self, data: Any, uri: str) -> None:
        if isinstance(data, type) or not dataclasses.is_dataclass(data):
            raise _refuse(data, "not a dataclass instance")
        if _has_init_vars(type(data)):
            raise _refuse(data, "the dataclass has InitVar fields")
        fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.init}
        if not is_json_exact(fields):
            raise _refuse(data, "its fields hold values JSON cannot give back exactly")
        _write_json(uri, fields)

    def load(self, data_type: type, uri: str) -> Any:
        if not is_dataclass_type(data_type):
            raise MaterializerError(
                f"cannot rebuild the dataclass stored at {uri}: its type "
                f"{data_type.__qualname__} is not a dataclass (is its module importable?)"
            )
        return data_type(**_read_json(uri))


class PathMaterializer(Materializer, builtin=True):
    """A `pathlib.Path` to a file or directory: its content is copied into the artifact.

    `load` returns a Path to the copy inside the artifact store; treat it as read-only, since
    equal content is shared between artifacts.
    """

    ASSOCIATED_TYPES = (Path,)

    def save(self, data: Any, uri: str) -> None:
        if not isinstance(data, Path):
            raise _refuse(data, "not a pathlib.Path")
        target = os.path.join(uri, "payload", data.name or "content")
        if data.is_dir():
            shutil.copytree(data, target)
        elif data.is_file():
            os.makedirs(os.path.dirname(target))
            shutil.copy2(data, target)
        else:
            raise _refuse(data, f"{data} is neither a file nor a directory")

    def load(self, data_type: type, uri: str) -> Any:
        entries = os.listdir(os.path.join(uri, "payload"))
        if len(entries) != 1:
            raise MaterializerError(f"the path artifact at {uri} holds {len(entries)} entries")
        return Path(uri, "payload", entries[0])
