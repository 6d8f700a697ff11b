"""Calling a step outside a pipeline, and `entrypoint`.

- `train_classifier(...)` outside a pipeline runs the step alone, as an unlisted one-step run:
  inputs are validated, hooks run, `get_step_context()` works, and the call returns the
  step's output value(s) (a tuple for several outputs). Caching is off for such runs.
- `await train_classifier.run(...)` does the same on an event loop.
- `train_classifier.entrypoint(...)` calls the raw function and nothing else.
- With `FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK=true`, a plain call is `entrypoint`.
- A wrong input type raises `StepInputError` directly.

Run it with:  python examples/single_step.py
"""

from __future__ import annotations

import asyncio
import logging
import os

import flowcore
from flowcore import Client, Stack, StepInputError, enable_console_logging, get_step_context, step


def announce(step_name: str) -> None:
    print(f"  [on_success] {step_name} finished")


@step(on_success=announce)
def train_classifier(x_train: list[float], y_train: list[int]) -> tuple[float, float]:
    try:
        where = f"in run {get_step_context().pipeline_run.name}"
    except flowcore.StepContextError:
        where = "with no run (entrypoint)"
    print(f"  [body] training on {len(x_train)} samples {where}")
    threshold = sum(x_train) / len(x_train)
    predictions = [int(x > threshold) for x in x_train]
    accuracy = sum(p == y for p, y in zip(predictions, y_train, strict=True)) / len(y_train)
    return threshold, accuracy  # a tuple literal: two outputs


X_TRAIN = [0.1, 0.4, 0.35, 0.8, 0.9, 0.7]
Y_TRAIN = [0, 0, 0, 1, 1, 1]


def main() -> None:
    enable_console_logging(logging.WARNING)
    flowcore.set_active_stack(Stack.in_memory())

    print("1) a plain call: an unlisted one-step run")
    model, accuracy = train_classifier(x_train=X_TRAIN, y_train=Y_TRAIN)
    print(f"  threshold {model:.3f}, accuracy {accuracy:.2f}")
    print(f"  listed runs: {Client().list_pipeline_runs()} (single-step runs are unlisted)")

    print("\n2) await step.run(...) on an event loop")
    model, accuracy = asyncio.run(train_classifier.run(x_train=X_TRAIN, y_train=Y_TRAIN))
    print(f"  threshold {model:.3f}, accuracy {accuracy:.2f}")

    print("\n3) entrypoint: the raw function, no run, no hooks")
    model, accuracy = train_classifier.entrypoint(x_train=X_TRAIN, y_train=Y_TRAIN)
    print(f"  threshold {model:.3f}, accuracy {accuracy:.2f}")

    print("\n4) FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK=true makes a plain call the entrypoint")
    os.environ["FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK"] = "true"
    try:
        train_classifier(x_train=X_TRAIN, y_train=Y_TRAIN)
    finally:
        del os.environ["FLOWCORE_RUN_SINGLE_STEPS_WITHOUT_STACK"]

    print("\n5) a wrong input type raises StepInputError directly")
    try:
        train_classifier(x_train="not a list", y_train=Y_TRAIN)
    except StepInputError as exc:
        print(f"  StepInputError: {exc}")


if __name__ == "__main__":
    main()
