"""Materializers: how step outputs are written into artifact directories and read back.

Importing this package is cheap: numpy and pydantic materializers are imported only when a
numpy or pydantic type is first looked up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowcore.materializers._base import (
    Materializer,
    is_builtin_materializer,
    materializer_for,
    remember_type,
    resolve_materializer,
    type_from_name,
)
from flowcore.materializers._builtin import (
    BuiltInContainerMaterializer,
    BuiltInMaterializer,
    BytesMaterializer,
    DataclassMaterializer,
    PathMaterializer,
)
from flowcore.materializers._cloudpickle import CloudpickleMaterializer
from flowcore.materializers._content import (
    content_hash_of,
    directory_digest,
    files_digest,
    hash_directory,
    save_with_fallback,
)

if TYPE_CHECKING:
    from flowcore.materializers._numpy import NumpyMaterializer
    from flowcore.materializers._pydantic import PydanticMaterializer

__all__ = [
    "BuiltInContainerMaterializer",
    "BuiltInMaterializer",
    "BytesMaterializer",
    "CloudpickleMaterializer",
    "DataclassMaterializer",
    "Materializer",
    "NumpyMaterializer",
    "PathMaterializer",
    "PydanticMaterializer",
    "content_hash_of",
    "directory_digest",
    "files_digest",
    "hash_directory",
    "is_builtin_materializer",
    "materializer_for",
    "remember_type",
    "resolve_materializer",
    "save_with_fallback",
    "type_from_name",
]

_LAZY = {
    "NumpyMaterializer": "flowcore.materializers._numpy",
    "PydanticMaterializer": "flowcore.materializers._pydantic",
}


def __getattr__(name: str) -> Any:
    # Imported on first access so `import flowcore.materializers` never imports numpy.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flowcore.materializers' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(module), name)
