"""Keeps the import direction of ARCHITECTURE.md true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "flowcore"

# module (relative to flowcore/, without .py) -> layer
LAYERS: dict[str, int] = {
    "exceptions": 0, "_events": 0, "typing": 0,
    "config": 1, "_canonical": 1, "_signature": 1, "_graph": 1, "_retry": 1, "_naming": 1, "_models": 1,
    "_step": 2, "_pipeline": 2, "_compile": 2,
    "stores": 3, "materializers": 3, "_logging": 3, "_capture": 3, "_threads": 3, "_batching": 3,
    "stack._operators": 3,
    "stack._alerters": 3, "stack._trackers": 3, "stack._process_worker": 3,
    "_cache": 4, "_hooks": 4, "context": 4, "stack": 4, "stack._yaml": 4,
    "_runner": 5, "_prepare": 5, "_handles": 5, "_sync": 5, "_single": 5,
    "__init__": 6, "__main__": 6, "client": 6, "hooks": 6, "testing": 6, "cli": 6,
    "_report": 6, "_progress": 6,
}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    while parts:
        key = ".".join(parts)
        if key in LAYERS:
            return LAYERS[key]
        parts.pop()
    return None


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        out.append((name, path))
    return out


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported flowcore module, is_lazy) for each import in a file; lazy = inside a function
    or under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            )
            if isinstance(child, ast.ImportFrom) and child.module == "flowcore":
                # `from flowcore import _logging`: each name may be a submodule.
                for alias in child.names:
                    sub = alias.name if (PKG / f"{alias.name}.py").exists() or (
                        PKG / alias.name).is_dir() else ""
                    found.append((sub, lazy))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith(
                "flowcore."
            ):
                found.append((child.module.removeprefix("flowcore."), lazy))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("flowcore."):
                        found.append((alias.name.removeprefix("flowcore."), lazy))
            visit(child, child_lazy)

    visit(tree, False)
    return found


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_module_imports_only_lower_layers(module: str, path: Path) -> None:
    """Every flowcore module imports only modules of its own or lower layers at import time."""
    own = layer_of(module or "__init__")
    assert own is not None, f"flowcore.{module} has no layer in ARCHITECTURE.md's table"
    for target, lazy in imports_of(path):
        if not target:
            target = "__init__"
        theirs = layer_of(target)
        assert theirs is not None, f"flowcore.{module} imports unknown flowcore.{target}"
        if lazy:
            continue
        assert theirs <= own, (
            f"flowcore.{module} (layer {own}) imports flowcore.{target} (layer {theirs})"
        )


def test_pipeline_reaches_runner_only_lazily() -> None:
    """_pipeline.py imports the runner only inside functions (one late import in run())."""
    for target, lazy in imports_of(PKG / "_pipeline.py"):
        if target in ("_runner", "_sync", "_prepare", "_handles"):
            assert lazy


def test_stores_and_graph_never_import_the_runner() -> None:
    """The graph and the stores never import the runner, even lazily."""
    for path in [PKG / "_graph.py", *sorted((PKG / "stores").glob("*.py"))]:
        for target, _ in imports_of(path):
            assert target not in ("_runner", "_sync", "_single", "_prepare", "_handles"), path
