"""Whose module is a piece of code in: the user's own (followed into when a step's cache key
is computed) or an installed package or the standard library (counted by name and version)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
import sysconfig

__all__ = ["is_own_module", "module_label", "package_identity"]


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


_LIBRARY_DIRS = _library_dirs()
_own: dict[str, bool] = {}


def module_label(module_name: str) -> str:
    """A module's name in key components; `__main__` is named by its file, so a script run
    directly and the same file imported by name give one key."""
    if module_name == "__main__":
        file = getattr(sys.modules.get("__main__"), "__file__", None)
        if file:
            return str(os.path.splitext(os.path.basename(str(file)))[0])
    return module_name


def is_own_module(name: str) -> bool:
    """Whether module `name` is the user's own code (followed into), not an installed package
    or the standard library (counted by version). flowcore itself is never the user's."""
    found = _own.get(name)
    if found is None:
        found = _own[name] = _is_own(name)
    return found


def _is_own(name: str) -> bool:
    top = name.partition(".")[0]
    if name == "__main__":
        return True
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "flowcore":
        return False
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if not file:
        return True  # defined by exec or a namespace package: follow it, never assume
    path = os.path.realpath(file)
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not path.startswith(_LIBRARY_DIRS)


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return dict(importlib.metadata.packages_distributions())


@functools.cache
def package_identity(module_name: str) -> tuple[str, str]:
    """(distribution or module name, version) of the package that module belongs to."""
    top = module_name.partition(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return "python", sys.version.split()[0]
    for dist in _distributions().get(top, []):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    module = sys.modules.get(top)
    return top, str(getattr(module, "__version__", "unknown"))
