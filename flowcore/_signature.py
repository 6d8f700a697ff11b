"""Inspection of step functions, done once at decoration: inputs, outputs and type checks."""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from flowcore.exceptions import PipelineDefinitionError

__all__ = ["InputSpec", "OutputSpec", "StepSignature", "inspect_step_function",
           "resolve_annotations", "resolve_annotations_checked"]

_EMPTY = inspect.Parameter.empty
# Inputs are validated in pydantic's default (lax) mode, as ZenML does: "3" becomes 3 for an
# int. Outputs stay strict: a step's own return value is not silently converted.
_LAX_CONFIG = ConfigDict(arbitrary_types_allowed=True)
_STRICT_CONFIG = ConfigDict(arbitrary_types_allowed=True, strict=True)
# Builtins pydantic converts from other types in lax mode; any other class is an isinstance test.
_CONVERTIBLE = frozenset({int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset})

# Takes a value and returns it validated (converted for a lax input check), or raises
# TypeError/ValueError.
Checker = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One parameter of a step function."""

    name: str
    annotation: Any
    default: Any
    kind: inspect._ParameterKind
    check: Checker | None

    @property
    def required(self) -> bool:
        return self.default is _EMPTY and self.kind not in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        )


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """One output of a step: its name, its annotation (or Any) and its type check."""

    name: str
    annotation: Any
    check: Checker | None


@dataclass(frozen=True, slots=True)
class StepSignature:
    """Everything flowcore needs to know about a step function, computed once."""

    inputs: dict[str, InputSpec]
    outputs: tuple[OutputSpec, ...]
    multiple_outputs: bool
    is_async: bool
    has_var_keyword: bool
    missing_annotations: tuple[str, ...]
    source: str

    positional: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    defaults: dict[str, Any] | None = None
    output_names: tuple[str, ...] = ()
    checked_inputs: bool = False  # whether any input has a type check
    # False when an annotation could not be evaluated yet (a forward reference): the step
    # inspects again on first use instead of keeping Any for it.
    resolved: bool = True


def _strip_annotated(tp: Any) -> tuple[Any, str | None]:
    if get_origin(tp) is Annotated:
        args = get_args(tp)
        name = next((a for a in args[1:] if isinstance(a, str)), None)
        return args[0], name
    return tp, None


def _adapter(tp: Any, config: ConfigDict) -> TypeAdapter[Any] | None:
    try:
        return TypeAdapter(tp, config=config)
    except Exception:
        pass
    try:
        # Models, dataclasses and TypedDicts refuse a config of their own.
        return TypeAdapter(tp)
    except Exception:
        return None


def _make_check(tp: Any, *, lax: bool = False) -> Checker | None:
    """A callable returning the validated value or raising TypeError/ValueError; None for Any.

    `lax` converts as pydantic's default mode does (inputs); otherwise values must already
    match (outputs).
    """
    if tp is Any or tp is _EMPTY or tp is object or isinstance(tp, typing.TypeVar):
        return None
    if tp is None or tp is type(None):
        def check_none(value: Any) -> Any:
            if value is not None:
                raise TypeError(f"expected None, got {type(value).__name__}")
            return value
        return check_none
    if isinstance(tp, type) and get_origin(tp) is None:
        return _class_check(tp, lax)
    adapter = _adapter(tp, _LAX_CONFIG if lax else _STRICT_CONFIG)
    if adapter is None:
        origin = get_origin(tp)
        if isinstance(origin, type):
            def check_origin(value: Any) -> Any:
                if not isinstance(value, origin):
                    raise TypeError(f"expected {origin.__qualname__}, got {type(value).__name__}")
                return value
            return check_origin
        return None

    def check_adapter(value: Any) -> Any:
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            raise TypeError(_short_validation(exc, tp)) from None
    return check_adapter


def _class_check(tp: type, lax: bool) -> Checker:
    """A check for a plain class: an exact-type fast path, pydantic only when it may convert."""
    if not lax and tp is not float and tp is not complex:
        if tp is int:
            def check_int(value: Any) -> Any:
                if type(value) is bool or not isinstance(value, int):
                    raise TypeError(f"expected int, got {type(value).__name__}")
                return value
            return check_int

        def check_instance(value: Any) -> Any:
            if not isinstance(value, tp):
                raise TypeError(f"expected {tp.__qualname__}, got {type(value).__name__}")
            return value
        return check_instance

    convertible = tp in _CONVERTIBLE or issubclass(tp, BaseModel)
    # Built on first conversion, not at decoration: most values already have the exact type.
    adapter: list[TypeAdapter[Any] | None] = []

    def check_class(value: Any) -> Any:
        if type(value) is tp or (not convertible and isinstance(value, tp)):
            return value
        if not adapter:
            adapter.append(_adapter(tp, _LAX_CONFIG if lax else _STRICT_CONFIG))
        built = adapter[0]
        if built is None:
            if isinstance(value, tp):
                return value
            raise TypeError(f"expected {tp.__qualname__}, got {type(value).__name__}")
        try:
            return built.validate_python(value)
        except ValidationError as exc:
            raise TypeError(_short_validation(exc, tp)) from None
    return check_class


def _short_validation(exc: ValidationError, tp: Any) -> str:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": str(exc), "loc": ()}
    loc = ".".join(str(x) for x in first["loc"])
    where = f" at {loc}" if loc else ""
    return f"expected {_type_name(tp)}{where}: {first['msg']}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


class _ReturnFinder(ast.NodeVisitor):
    """Collects the `return` statements of one function, not of functions nested in it."""

    def __init__(self) -> None:
        self.returns: list[ast.Return] = []
        self._depth = 0

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._nested(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        return None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        return None

    def _nested(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if self._depth == 0:
            self._depth += 1
            for stmt in node.body:
                self.visit(stmt)
            self._depth -= 1

    def visit_Return(self, node: ast.Return) -> None:
        self.returns.append(node)


def _function_source(func: Callable[..., Any]) -> str:
    try:
        return textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        code = getattr(func, "__code__", None)
        return repr(code.co_code) if code is not None else repr(func)


def _strip_decorators(source: str) -> str:
    """The function's source without decorator lines, so re-decorating does not bust caches."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.decorator_list = []
            return ast.unparse(node)
    return source


def _analyse_returns(source: str) -> tuple[int | None, bool]:
    """(tuple-literal length if every return returns a tuple literal, has any value return)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None, True
    fn = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)), None
    )
    if fn is None:
        return None, True
    finder = _ReturnFinder()
    finder.visit(fn)
    valued = [
        r for r in finder.returns
        if r.value is not None
        and not (isinstance(r.value, ast.Constant) and r.value.value is None)
    ]
    if not valued:
        return None, False
    if all(isinstance(r.value, ast.Tuple) for r in valued):
        lengths = {len(r.value.elts) for r in valued if isinstance(r.value, ast.Tuple)}
        if len(lengths) == 1:
            return lengths.pop(), True
        return max(lengths), True
    return None, True


def resolve_annotations(func: Callable[..., Any]) -> dict[str, Any]:
    """The function's annotations, evaluated one by one: an annotation that cannot be resolved
    (a TYPE_CHECKING-only import under postponed evaluation) becomes Any instead of hiding the
    others."""
    return _resolve(func)[0]


def resolve_annotations_checked(func: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """`resolve_annotations` and whether every annotation resolved."""
    return _resolve(func)


def _resolve(func: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """(annotations, whether every one of them resolved)."""
    try:
        return typing.get_type_hints(func, include_extras=True), True
    except Exception:
        pass
    raw = dict(getattr(func, "__annotations__", {}) or {})
    namespace = {**vars(typing), **getattr(func, "__globals__", {})}
    out: dict[str, Any] = {}
    complete = True
    for name, ann in raw.items():
        if isinstance(ann, str):
            try:
                ann = eval(ann, namespace)  # as typing.get_type_hints does
            except Exception:
                ann = Any
                complete = False
        out[name] = ann
    return out, complete


def inspect_step_function(func: Callable[..., Any], step_name: str) -> StepSignature:
    """Inspect a step function once; the result drives binding, checks and output naming."""
    sig = inspect.signature(func)
    hints, resolved = _resolve(func)
    missing: list[str] = []
    inputs: dict[str, InputSpec] = {}
    has_var_keyword = False
    for name, param in sig.parameters.items():
        ann = hints.get(name, _EMPTY)
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            has_var_keyword = True
        if ann is _EMPTY and param.kind not in (
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD
        ):
            missing.append(name)
        plain, _ = _strip_annotated(ann)
        check = None
        if param.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            check = _make_check(plain, lax=True)
        inputs[name] = InputSpec(name, plain, param.default, param.kind, check)

    raw_source = _function_source(func)
    source = _strip_decorators(raw_source)
    tuple_len, has_value_return = _analyse_returns(raw_source)
    ret = hints.get("return", _EMPTY)
    if ret is _EMPTY:
        missing.append("return")
    outputs, multiple = _outputs_from(ret, tuple_len, has_value_return)
    names = [o.name for o in outputs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise PipelineDefinitionError(
            f"step '{step_name}': two outputs are named '{dup}'; give each output its own name"
        )
    positional = tuple(
        s.name for s in inputs.values()
        if s.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    return StepSignature(
        positional=positional,
        required=tuple(s.name for s in inputs.values() if s.required),
        defaults={s.name: s.default for s in inputs.values() if s.default is not _EMPTY},
        output_names=tuple(o.name for o in outputs),
        checked_inputs=any(spec.check is not None for spec in inputs.values()),
        inputs=inputs,
        outputs=outputs,
        multiple_outputs=multiple,
        is_async=inspect.iscoroutinefunction(func),
        has_var_keyword=has_var_keyword,
        missing_annotations=tuple(missing),
        source=source,
        resolved=resolved,
    )


def _outputs_from(
    ret: Any, tuple_len: int | None, has_value_return: bool
) -> tuple[tuple[OutputSpec, ...], bool]:
    """(the outputs, whether there are several) of a return annotation and the returns."""
    plain, name = _strip_annotated(ret)
    if plain is None or plain is type(None) or (ret is _EMPTY and not has_value_return):
        return (), False
    # Tuple literals mean several outputs only when nothing says otherwise: no annotation or a
    # tuple[...] one. `Annotated[list, "out"]` or `Annotated[tuple[...], "pair"]` is one output.
    tuple_annotated = name is None and get_origin(plain) is tuple
    if tuple_len is not None and (ret is _EMPTY or tuple_annotated):
        elems: list[Any] = []
        if tuple_annotated:
            args = get_args(plain)
            if len(args) == 2 and args[1] is Ellipsis:
                elems = [args[0]] * tuple_len
            else:
                elems = list(args)
        count = len(elems) if elems else tuple_len
        specs = []
        for i in range(count):
            elem = elems[i] if i < len(elems) else Any
            elem_plain, elem_name = _strip_annotated(elem)
            specs.append(OutputSpec(elem_name or f"output_{i}", elem_plain, _make_check(elem_plain)))
        return tuple(specs), True
    if ret is _EMPTY:
        return (OutputSpec("output", Any, None),), False
    return (OutputSpec(name or "output", plain, _make_check(plain)),), False
