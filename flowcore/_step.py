"""`@step`: the Step object, its options, and what calling it means in and out of a pipeline."""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from flowcore._graph import OutputRef
from flowcore._signature import StepSignature, inspect_step_function
from flowcore.config import as_cache_policy, env_flag, validate_step_options
from flowcore.exceptions import ConfigError, PipelineDefinitionError

__all__ = ["RECORDER", "STEP_OPTIONS", "OutputHandle", "Step", "env_flag", "step", "unmapped"]

if TYPE_CHECKING:
    from flowcore._recording import Recorder

F = TypeVar("F", bound=Callable[..., Any])

# The recorder of the pipeline function running now (set by `_recording.recording`). It lives
# here so a step call reads it without importing the recording module on every call.
RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
    "flowcore_recorder", default=None
)

STEP_OPTIONS = frozenset({
    "cache_policy", "enable_cache", "retry", "on_start", "on_success", "on_failure", "on_end", "timeout",
    "output_materializers", "settings", "step_operator", "experiment_tracker",
    "enable_artifact_metadata", "name", "extra", "pool", "log_limit",
})


def check_options(options: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    """Raise ConfigError naming the first unknown option (and the closest known one)."""
    import difflib

    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown option '{key}'{hint}")


def _check_ignored_names(func: Callable[..., Any], step_name: str, options: dict[str, Any]) -> None:
    """A step's `cache_policy.ignore` may name only its own inputs and parameters.

    Raises:
        ConfigError: naming the step and the unknown name, when the option is set.
    """
    policy = as_cache_policy(options.get("cache_policy"))
    if policy is None or not policy.ignore:
        return
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in policy.ignore:
        if name not in params:
            raise ConfigError(
                f"step '{step_name}': option 'cache_policy' ignores {name!r}, which is no input "
                f"or parameter of the step (it has: {', '.join(params) or 'none'})"
            )


class OutputHandle:
    """A placeholder for one output of a step invocation while a pipeline function runs.

    Pass it to other steps (a data dependency) or to `after=` (an order dependency).
    """

    __slots__ = ("_ref", "invocation_id", "output_name")

    def __init__(self, invocation_id: str, output_name: str | None) -> None:
        self.invocation_id = invocation_id
        self.output_name = output_name
        self._ref: OutputRef | None = None

    def as_ref(self) -> OutputRef | None:
        """The graph reference of this output (made once: a handle fanned out to 10,000 steps
        is one reference), or None for an invocation without outputs."""
        ref = self._ref
        if ref is None and self.output_name is not None:
            ref = self._ref = OutputRef(self.invocation_id, self.output_name)
        return ref

    def __repr__(self) -> str:
        out = f".{self.output_name}" if self.output_name else ""
        return f"<OutputHandle {self.invocation_id}{out}>"

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Any:
        raise PipelineDefinitionError(
            f"the output of step invocation '{self.invocation_id}' is only known at run time; "
            "it cannot be iterated while the pipeline function runs (use .map() for dynamic "
            "fan-out)"
        )


class unmapped:
    """Wraps an argument of `.map()` / `.product()` so every element gets it whole."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"unmapped({self.value!r})"


class Step:
    """A function turned into a pipeline step by `@step`.

    Inside a pipeline function, calling it records an invocation and returns output handles;
    outside one, it runs as a single-step run and returns its output value(s).
    """

    def __init__(self, func: Callable[..., Any], options: dict[str, Any] | None = None) -> None:
        opts = dict(options or {})
        func_name = getattr(func, "__name__", "step")
        check_options(opts, STEP_OPTIONS, f"step '{func_name}'")
        validate_step_options(opts, opts.get("name") or func_name)
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise PipelineDefinitionError(
                f"step '{func_name}' is a generator function; a step "
                "returns its outputs (collect the values into a list and return it)"
            )
        self.func = func
        self.name: str = opts.pop("name", None) or getattr(func, "__name__", "step")
        _check_ignored_names(func, self.name, opts)
        self._options = opts
        functools.update_wrapper(self, func)
        # What compiles resolved from this step's options (see _compile_static); emptied by
        # configure(), so a cached resolution never outlives the options it came from. Set
        # after update_wrapper, which copies a wrapped callable's __dict__.
        self._resolved: dict[Any, Any] = {}
        # Inspected now, so a definition error (two outputs of one name) is raised at `@step`.
        # An annotation naming a class not defined yet is resolved again on first use.
        self._signature: StepSignature | None = inspect_step_function(func, self.name)
        if not self._signature.resolved:
            self._signature = None

    @property
    def signature(self) -> StepSignature:
        """Inputs and outputs, inspected once."""
        if self._signature is None:
            self._signature = inspect_step_function(self.func, self.name)
        return self._signature

    @property
    def options(self) -> dict[str, Any]:
        """The options set explicitly (decorator and configure), as a copy."""
        return dict(self._options)

    @property
    def is_async(self) -> bool:
        return self.signature.is_async

    def __repr__(self) -> str:
        return f"<Step {self.name}>"

    def entrypoint(self, *args: Any, **kwargs: Any) -> Any:
        """Call the raw function, nothing else."""
        return self.func(*args, **kwargs)

    def configure(self, **options: Any) -> Step:
        """Change options in place; returns the same step."""
        check_options(options, STEP_OPTIONS, f"step '{self.name}'")
        validate_step_options(options, self.name)
        _check_ignored_names(self.func, self.name, options)
        if "name" in options:
            self.name = options.pop("name")
        self._options.update(options)
        self._resolved = {}
        return self

    def with_options(self, **options: Any) -> Step:
        """Return a copy with changed options; the original is unchanged."""
        clone = copy.copy(self)
        clone._options = dict(self._options)
        clone._resolved = {}
        return clone.configure(**options)

    def __call__(
        self,
        *args: Any,
        after: Any = None,
        step_name: str | None = None,
        id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        recorder = RECORDER.get()
        if recorder is not None:
            return recorder.add_invocation(self, args, kwargs, after, step_name or id)
        if env_flag("FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK"):
            return self.entrypoint(*args, **kwargs)
        from flowcore._engine._launch import run_step_sync

        return run_step_sync(self, args, kwargs)

    async def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run this step alone as an unlisted one-step run and return its output value(s)."""
        if env_flag("FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK"):
            result = self.entrypoint(*args, **kwargs)
            if self.is_async:
                result = await result
            return result
        from flowcore._engine._launch import run_step_async

        return await run_step_async(self, args, kwargs)

    def map(
        self,
        *args: Any,
        after: Any = None,
        step_name: str | None = None,
        id: str | None = None,
        **kwargs: Any,
    ) -> OutputHandle:
        """Fan out over a sequence at run time: one invocation per element.

        The first positional argument is mapped; further sequence arguments are zipped with it
        unless wrapped in `unmapped`. Returns one handle whose value is the list of results.
        """
        return self._expand(args, kwargs, after, step_name or id, product=False)

    def product(
        self,
        *args: Any,
        after: Any = None,
        step_name: str | None = None,
        id: str | None = None,
        **kwargs: Any,
    ) -> OutputHandle:
        """Fan out over the cartesian product of the sequence arguments."""
        return self._expand(args, kwargs, after, step_name or id, product=True)

    def _expand(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], after: Any,
        invocation_id: str | None, *, product: bool,
    ) -> OutputHandle:
        recorder = RECORDER.get()
        if recorder is None:
            raise PipelineDefinitionError(
                f"step '{self.name}': .map()/.product() work only inside a pipeline function"
            )
        handle = recorder.add_invocation(
            self, args, kwargs, after=after, invocation_id=invocation_id,
            mapping="product" if product else "zip",
        )
        assert isinstance(handle, OutputHandle)
        return handle


@overload
def step(func: F, /) -> Step: ...


@overload
def step(func: None = None, /, **options: Any) -> Callable[[Callable[..., Any]], Step]: ...


def step(func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Turn a function (sync or async) into a pipeline step.

    Use bare (`@step`) or with options (`@step(enable_cache=False, retry=...)`).
    """
    if func is not None:
        return Step(func, options)

    def decorate(f: Callable[..., Any]) -> Step:
        return Step(f, options)

    return decorate
