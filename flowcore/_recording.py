"""Recording step invocations while a pipeline function runs.

A step call inside a pipeline function lands in `Recorder.add_invocation`, once per node of
the graph, so it builds the graph's Node at once: its ID, its arguments split into constants
and references, and the positions of the invocations it reads from (an output handle always
belongs to an invocation recorded before it, so these are known already). The compile then
adds what needs the whole recording or the run's options: `after=` edges, the configuration,
the checks.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flowcore._arguments import ArgumentPlace, Where, to_refs
from flowcore._graph import MapSpec, Node, OutputRef, contains_ref, iter_refs
from flowcore._signature import StepSignature
from flowcore._step import RECORDER, OutputHandle, Step, unmapped
from flowcore.exceptions import PipelineDefinitionError, StepInputError

__all__ = ["Recorder", "current_recorder", "recording"]

# Argument values that cannot hold a handle (the common parameters): taken as they are.
_PLAIN = frozenset({str, int, float, bool, bytes, type(None), complex, range})


def current_recorder() -> Recorder | None:
    """The recorder of the pipeline function running now, if any."""
    return RECORDER.get()


def _after_ids(after: Any) -> Iterator[str]:
    if after is None:
        return
    if type(after) is list and all(type(a) is OutputHandle for a in after):
        yield from (a.invocation_id for a in after)
        return
    if isinstance(after, str):
        yield after
    elif isinstance(after, OutputHandle):
        yield after.invocation_id
    elif isinstance(after, list | tuple | set | frozenset):
        for a in after:
            yield from _after_ids(a)
    else:
        raise PipelineDefinitionError(
            f"after= takes invocation IDs or output handles, not {type(after).__name__}"
        )


def _no_outputs(where: Any, handle: OutputHandle) -> PipelineDefinitionError:
    return PipelineDefinitionError(
        f"{where}: step invocation '{handle.invocation_id}' has no outputs, so it cannot "
        "be passed as data; use after=[...] for an order-only dependency"
    )


class Recorder:
    """Collects step invocations while a pipeline function runs."""

    def __init__(self, pipeline_name: str, func: Any = None) -> None:
        self.pipeline_name = pipeline_name
        # Invocation ID -> its node (config and after= edges are filled in by the compile).
        self.invocations: dict[str, Node] = {}
        self._index: dict[str, int] = {}
        # Node position -> the `after=` IDs of that invocation (resolved by the compile, since
        # they may name invocations recorded later).
        self.after: dict[int, list[str]] = {}
        # Positions of nodes with a reference to an ID not recorded before them (a handle from
        # another recording): the compile resolves their references by ID.
        self.late: set[int] = set()
        self._next_suffix: dict[str, int] = {}
        # The pipelines whose functions are running now, outermost first (composition).
        self._chain: list[tuple[str, Any]] = [(pipeline_name, func)] if func is not None else []

    @contextmanager
    def composing(self, name: str, func: Any) -> Iterator[None]:
        """Mark pipeline `name` (its function `func`) as running inside the current one.

        Raises:
            PipelineDefinitionError: it is already running, so it calls itself, directly or
                through other pipelines; the message names the chain (`a -> b -> a`).
        """
        for i, (_, running) in enumerate(self._chain):
            if running is func:
                chain = " -> ".join([n for n, _ in self._chain[i:]] + [name])
                raise PipelineDefinitionError(
                    f"pipeline '{self.pipeline_name}': pipeline '{name}' calls itself "
                    f"({chain}); a pipeline cannot contain itself"
                )
        self._chain.append((name, func))
        try:
            yield
        finally:
            self._chain.pop()

    def _new_id(self, step: Step, explicit: str | None) -> str:
        if explicit is not None:
            if not isinstance(explicit, str) or not explicit:
                raise PipelineDefinitionError(
                    f"pipeline '{self.pipeline_name}': step '{step.name}' got invalid "
                    f"step_name {explicit!r}"
                )
            if explicit in self.invocations:
                raise PipelineDefinitionError(
                    f"pipeline '{self.pipeline_name}': invocation ID '{explicit}' is used twice; "
                    "give each invocation its own step_name="
                )
            return explicit
        base = step.name
        if base not in self.invocations:
            return base
        # Remember the last suffix per name so n repeats cost O(n), not O(n^2).
        k = self._next_suffix.get(base, 2)
        while f"{base}_{k}" in self.invocations:
            k += 1
        self._next_suffix[base] = k + 1
        return f"{base}_{k}"

    def _bind(
        self, sig: StepSignature, inv_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """The call's arguments by parameter name, checked against the step's signature."""
        positional = sig.positional
        if len(args) > len(positional):
            raise StepInputError(
                f"{Where(self.pipeline_name, inv_id)}: takes {len(positional)} positional "
                f"argument(s) but {len(args)} were given"
            )
        if len(args) == 1:
            raw: dict[str, Any] = {positional[0]: args[0]}
        else:
            raw = dict(zip(positional, args, strict=False)) if args else {}
        inputs = sig.inputs
        for key, value in kwargs.items():
            if key in raw:
                raise StepInputError(
                    f"{Where(self.pipeline_name, inv_id)}: got multiple values for argument "
                    f"'{key}'"
                )
            if key not in inputs and not sig.has_var_keyword:
                close = difflib.get_close_matches(key, list(inputs), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise StepInputError(
                    f"{Where(self.pipeline_name, inv_id)}: got an unexpected argument "
                    f"'{key}'{hint}"
                )
            raw[key] = value
        return raw

    def add_invocation(
        self,
        step: Step,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        after: Any = None,
        invocation_id: str | None = None,
        mapping: str | None = None,
    ) -> Any:
        """Record one step call; returns its output handle(s).

        Takes `kwargs` over (a step call's own `**kwargs` dict). This runs once per node, so
        the common case (plain values and handles) is spelled out inline.
        """
        invocations = self.invocations
        inv_id = step.name
        if invocation_id is not None:
            inv_id = self._new_id(step, invocation_id)
        elif inv_id in invocations:
            # A repeated step: `name_k`, remembering k so n repeats cost O(n).
            k = self._next_suffix.get(inv_id, 2)
            candidate = f"{inv_id}_{k}"
            if candidate in invocations:
                candidate = self._new_id(step, None)
            else:
                self._next_suffix[inv_id] = k + 1
            inv_id = candidate
        sig = step._signature or step.signature
        inputs = sig.inputs
        if not args:
            # Keywords only, all known: the call's own dict is used as it is.
            raw = kwargs if inputs.keys() >= kwargs.keys() else self._bind(
                sig, inv_id, args, kwargs)
        elif (len(args) == 1 and sig.positional and inputs.keys() >= kwargs.keys()
                and sig.positional[0] not in kwargs):
            raw = {sig.positional[0]: args[0], **kwargs}
        else:
            raw = self._bind(sig, inv_id, args, kwargs)
        mapped: tuple[str, ...] = ()
        if mapping is not None:
            mapped = self._mapped(sig, inv_id, args, raw)
        index = self._index
        position = len(invocations)
        # `raw` becomes the node's arguments: handles are replaced by references in place.
        constants: dict[str, Any] = {}
        direct: tuple[tuple[str, OutputRef], ...] = ()
        nested: tuple[tuple[str, Any], ...] = ()
        parents: list[int] = []
        for key, value in raw.items():
            kind = type(value)
            if kind in _PLAIN:
                constants[key] = value
                continue
            if kind is OutputHandle:
                ref = value._ref
                if ref is None:
                    ref = value.as_ref()
                    if ref is None:
                        raise _no_outputs(
                            ArgumentPlace(Where(self.pipeline_name, inv_id), key), value)
                raw[key] = ref
                direct += ((key, ref),)
                parent = index.get(ref.node_id)
                if parent is None:
                    self.late.add(position)
                else:
                    parents.append(parent)
                continue
            if (kind is list or kind is tuple) and all(type(v) is OutputHandle for v in value):
                # Fan-in of handles (the common case), without the general search.
                refs = [h.as_ref() for h in value]
                if None in refs:
                    bad = next(h for h in value if h.output_name is None)
                    raise _no_outputs(ArgumentPlace(Where(self.pipeline_name, inv_id), key), bad)
                converted: Any = refs if kind is list else tuple(refs)
            else:
                converted = to_refs(value, ArgumentPlace(Where(self.pipeline_name, inv_id), key))
            raw[key] = converted
            if isinstance(converted, OutputRef):
                direct += ((key, converted),)
            elif contains_ref(converted):
                nested += ((key, converted),)
            else:
                constants[key] = converted
                continue
            for ref in iter_refs(converted):
                parent = index.get(ref.node_id)
                if parent is None:
                    self.late.add(position)
                else:
                    parents.append(parent)
        if mapping is not None and not mapped:
            raise StepInputError(
                f"{Where(self.pipeline_name, inv_id)}: .map()/.product() needs at least one "
                "sequence argument"
            )
        if after is not None:
            after_ids = list(_after_ids(after))
            if after_ids:
                self.after[position] = after_ids
        if not parents:
            data_parents: tuple[int, ...] = ()
        elif len(parents) == 1:
            data_parents = (parents[0],)
        else:
            data_parents = tuple(sorted(set(parents)))
        index[inv_id] = position
        invocations[inv_id] = Node(
            inv_id, position, step, None, raw, data_parents, data_parents,
            None if mapping is None else MapSpec(mapped, mapping == "product"),
            constants, direct, nested,
        )
        if mapping is not None:
            return OutputHandle(inv_id, "output")
        names = sig.output_names
        if not names:
            return OutputHandle(inv_id, None)
        if sig.multiple_outputs:
            return tuple(OutputHandle(inv_id, n) for n in names)
        return OutputHandle(inv_id, names[0])

    @staticmethod
    def _mapped(sig: StepSignature, inv_id: str, args: tuple[Any, ...], raw: dict[str, Any],
                ) -> tuple[str, ...]:
        """The arguments a .map()/.product() iterates over; `unmapped` ones are unwrapped."""
        positional = sig.positional
        mapped: list[str] = []
        for key, value in raw.items():
            if isinstance(value, unmapped):
                raw[key] = value.value
            elif (
                (positional and key == positional[0] and args)
                or isinstance(value, OutputHandle | list | tuple)
            ):
                mapped.append(key)
        return tuple(mapped)


class recording:
    """Make a new recorder current while a pipeline function (`func`, if given) runs."""

    __slots__ = ("_recorder", "_token")

    def __init__(self, pipeline_name: str, func: Any = None) -> None:
        self._recorder = Recorder(pipeline_name, func)

    def __enter__(self) -> Recorder:
        self._token = RECORDER.set(self._recorder)
        return self._recorder

    def __exit__(self, *exc: object) -> None:
        RECORDER.reset(self._token)
