"""A step's inputs checked and its return value split, checked and stored as artifacts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from flowcore._engine._plan import NodePlan
from flowcore._graph import Node
from flowcore._models import ArtifactVersion, StepRun
from flowcore.exceptions import MaterializerError, StepInputError, StepOutputError
from flowcore.materializers import materializer_for
from flowcore.stores._base import ArtifactStore

__all__ = ["check_inputs", "output_value", "split_outputs", "store_outputs"]


def check_inputs(where: str, node: Node, kwargs: dict[str, Any]) -> None:
    """Validate annotated inputs in place: the body receives the validated (lax-mode) values.

    Raises:
        StepInputError: a value cannot be converted to its annotation.
    """
    inputs = node.step.signature.inputs
    for key, value in kwargs.items():
        spec = inputs.get(key)
        if spec is None or spec.check is None:
            continue
        try:
            kwargs[key] = spec.check(value)
        except (TypeError, ValueError) as exc:
            raise StepInputError(
                f"{where}, step '{node.id}': input '{key}' has the wrong type: {exc}"
            ) from None


def _check_output(where: str, node: Node, name: str, check: Callable[[Any], Any],
                  value: Any) -> None:
    try:
        check(value)
    except (TypeError, ValueError) as exc:
        raise StepOutputError(
            f"{where}, step '{node.id}': output '{name}' has the wrong type: {exc}"
        ) from None


def split_outputs(where: str, node: Node, result: Any) -> dict[str, Any]:
    """The body's return value as named outputs, each checked against its annotation."""
    sig = node.step.signature
    outputs = sig.outputs
    if not outputs:
        return {}
    if not sig.multiple_outputs:
        spec = outputs[0]
        if spec.check is not None:
            _check_output(where, node, spec.name, spec.check, result)
        return {spec.name: result}
    if not isinstance(result, tuple | list) or len(result) != len(outputs):
        got = f"{len(result)} values" if isinstance(result, tuple | list) else (
            type(result).__name__)
        raise StepOutputError(
            f"{where}, step '{node.id}' declares {len(outputs)} outputs "
            f"({', '.join(sig.output_names)}) but returned {got}"
        )
    values = {}
    for spec, value in zip(outputs, result, strict=True):
        if spec.check is not None:
            _check_output(where, node, spec.name, spec.check, value)
        values[spec.name] = value
    return values


def output_value(node: Node, values: dict[str, Any] | list[Any]) -> Any:
    """What hooks (`step_output`) and single-step calls see: one value, a tuple, or None."""
    sig = node.step.signature
    seq = list(values.values()) if isinstance(values, dict) else values
    if not sig.outputs or not seq:
        return None
    if sig.multiple_outputs:
        return tuple(seq)
    return seq[0]


async def store_outputs(
    where: str, node: Node, sr: StepRun, plan: NodePlan, store: ArtifactStore,
    values: dict[str, Any],
) -> dict[str, ArtifactVersion]:
    """Store each output with its materializer.

    Raises:
        MaterializerError: no materializer could store an output.
    """
    if not values:
        return {}
    chosen = plan.materializers
    artifacts = {}
    for name, value in values.items():
        materializer = (chosen.get(name) or chosen.get("*") if chosen else None
                        ) or materializer_for(type(value))
        try:
            artifacts[name] = await store.save(
                value,
                materializer=materializer,
                data_type=type(value),
                name=name,
                producer_step_run_id=sr.id,
                step_label=f"{where}, step '{node.id}', output '{name}'",
            )
        except (MaterializerError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise MaterializerError(
                f"{where}, step '{node.id}', output '{name}': cannot store "
                f"{type(value).__name__} with {materializer.__name__}: {exc}"
            ) from exc
    return artifacts
