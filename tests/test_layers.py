"""Keeps the import direction of ARCHITECTURE.md true."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "flowcore"

# module (relative to flowcore/, without .py) -> layer
LAYERS: dict[str, int] = {
    "exceptions": 0, "events": 0, "typing": 0, "_clock": 0, "_threads": 0, "_ids": 0,
    "config": 1, "_canonical": 1, "_signature": 1, "_graph": 1, "_retry": 1, "_naming": 1, "_models": 1,
    "_code_identity": 1, "_code_modules": 1,
    "_step": 2, "_pipeline": 2, "_compile": 2, "_arguments": 2, "_recording": 2,
    "_compile_static": 2,
    "stores": 3, "materializers": 3, "_logging": 3, "_capture": 3, "_batching": 3,
    "stack._operators": 3,
    "stack._alerters": 3, "stack._trackers": 3, "stack._process_worker": 3, "stack._remote_data": 3,
    "_cache": 4, "_hooks": 4, "context": 4, "stack": 4, "stack._yaml": 4, "stack._urls": 4,
    "_engine": 5,
    "__init__": 6, "__main__": 6, "client": 6, "hooks": 6, "testing": 6, "cli": 6,
    "_report": 6, "_progress": 6, "_runview": 6,
}

# The engine's modules in order: each imports only those before it (late imports included).
ENGINE_ORDER = ["_shield", "_plan", "_lifecycle", "_isolation", "_outputs", "_invocation", "_fanout",
                "_scheduler", "_run", "_handle", "_full_passes", "_start_gate", "_submit", "_launch"]

# The only imports that point up the table: the definition layer starting runs.
LATE_EDGES = {("_pipeline", "_engine._launch"), ("_step", "_engine._launch")}


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


def imports_of(path: Path, *, typing_only: bool = True) -> list[tuple[str, bool]]:
    """(imported flowcore module, is_lazy) for each import in a file; lazy = inside a function
    or under TYPE_CHECKING. `typing_only=False` leaves out imports under TYPE_CHECKING, which
    create no edge at run time."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if not typing_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(
                child.test
            ):
                continue
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


def test_upward_imports_are_exactly_the_documented_late_edges() -> None:
    """Imports from a lower layer into a higher one, lazy ones included, are exactly the two
    documented late edges (the definition layer starting runs through _engine._launch)."""
    upward = set()
    for module, path in modules():
        own = layer_of(module or "__init__")
        assert own is not None
        for target, lazy in imports_of(path, typing_only=False):
            theirs = layer_of(target or "__init__")
            assert theirs is not None
            if theirs > own:
                assert lazy, f"flowcore.{module} imports flowcore.{target} at import time"
                upward.add((module, target))
    assert upward == LATE_EDGES


def test_engine_modules_import_only_those_before_them() -> None:
    """Inside flowcore/_engine each module imports only the engine modules listed before it."""
    found = sorted(p.stem for p in (PKG / "_engine").glob("_*.py") if p.stem != "__init__")
    assert sorted(ENGINE_ORDER) == found, "ENGINE_ORDER must list every engine module"
    for position, name in enumerate(ENGINE_ORDER):
        allowed = {f"_engine.{m}" for m in ENGINE_ORDER[:position]}
        for target, _ in imports_of(PKG / "_engine" / f"{name}.py"):
            if target.startswith("_engine"):
                assert target in allowed, f"_engine.{name} imports {target}"


def test_stores_and_graph_never_import_the_engine() -> None:
    """The graph and the stores never import the engine, even lazily."""
    for path in [PKG / "_graph.py", *sorted((PKG / "stores").glob("*.py"))]:
        for target, _ in imports_of(path):
            assert not target.startswith("_engine"), path


def test_only_the_lifecycle_assigns_statuses() -> None:
    """Outside _engine/_lifecycle.py no engine code assigns a run's or a step's `.status`."""
    for path in sorted((PKG / "_engine").glob("*.py")):
        if path.name == "_lifecycle.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    assert not (isinstance(target, ast.Attribute) and target.attr == "status"), (
                        f"{path.name}:{node.lineno} assigns .status")
