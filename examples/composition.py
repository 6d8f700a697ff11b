"""Pipeline composition: calling a pipeline inside another pipeline inlines its steps.

This is the ZenML guide's example. `data_pipeline(mode=...)` is an ordinary pipeline (it
can run on its own, too); called inside `training_pipeline` it adds its steps to the outer
graph and returns what its function returns (here, the handle of the preprocessed data).
Because `data_pipeline` is used twice, the repeated step gets the ID `preprocessing_step_2`.
Plain Python (`if mode == "train":`) decides which loader is part of the graph.

Run it with:  python examples/composition.py
"""

from __future__ import annotations

import logging
from typing import Annotated

import flowcore
from flowcore import OutputHandle, Stack, enable_console_logging, pipeline, step


@step
def training_data_loader_step() -> list[tuple[float, float]]:
    return [(x, 3.0 * x + 1.0) for x in range(10)]


@step
def test_data_loader_step() -> list[tuple[float, float]]:
    return [(x, 3.0 * x + 1.0) for x in range(10, 15)]


@step
def preprocessing_step(data: list[tuple[float, float]]) -> list[tuple[float, float]]:
    # Centre x around zero; y stays as it is.
    return [(x - 5.0, y) for x, y in data]


@step
def train_model(data: list[tuple[float, float]]) -> Annotated[dict[str, float], "model"]:
    """Least-squares fit of y = slope * x + intercept."""
    n = len(data)
    mean_x = sum(x for x, _ in data) / n
    mean_y = sum(y for _, y in data) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in data) / sum(
        (x - mean_x) ** 2 for x, _ in data
    )
    return {"slope": slope, "intercept": mean_y - slope * mean_x}


@step
def evaluate_model(
    model: dict[str, float], data: list[tuple[float, float]]
) -> Annotated[float, "mse"]:
    errors = [(model["slope"] * x + model["intercept"] - y) ** 2 for x, y in data]
    return sum(errors) / len(errors)


@pipeline
def data_pipeline(mode: str) -> OutputHandle:
    if mode == "train":
        data = training_data_loader_step()
    else:
        data = test_data_loader_step()

    processed_data: OutputHandle = preprocessing_step(data)
    return processed_data


@pipeline
def training_pipeline() -> None:
    # Use another pipeline inside this pipeline
    training_data = data_pipeline(mode="train")
    model = train_model(data=training_data)
    test_data = data_pipeline(mode="test")
    evaluate_model(model=model, data=test_data)


def main() -> None:
    enable_console_logging(logging.WARNING)
    flowcore.set_active_stack(Stack.in_memory())

    run = training_pipeline()
    print(f"run {run.name}: {run.status.value.upper()}")
    for name, step_run in run.steps.items():
        print(f"  {name:<27} {step_run.status.value.upper()}")
    model = run.steps["train_model"].outputs["model"].load()
    mse = run.steps["evaluate_model"].outputs["mse"].load()
    print(f"model: y = {model['slope']:.2f} * x + {model['intercept']:.2f}; test MSE {mse:.3f}")

    # The inner pipeline still runs on its own.
    alone = data_pipeline(mode="test")
    print(f"data_pipeline alone: steps {list(alone.steps)}")


if __name__ == "__main__":
    main()
