"""Quickstart: a small training pipeline, run twice, with results read back.

It shows:
- steps with typed inputs and outputs; `Annotated[T, "name"]` names an output, and a
  `return a, b` makes two outputs;
- a pipeline that wires the steps together by passing output handles;
- caching: the second run finds every step in the cache (status CACHED, bodies not run),
  and a changed parameter re-runs only the steps it affects;
- `Client` to read runs and load their artifacts back.

It uses the default local stack, a SQLite database and artifact files under
`$FLOWCORE_HOME` (default `./.flowcore`), so the cache outlives the process: run the script
a second time and even its first run is CACHED. Delete that directory to start afresh.

Run it with:  python examples/quickstart.py
"""

from __future__ import annotations

import random
from typing import Annotated

from flowcore import Client, enable_console_logging, pipeline, step

Dataset = dict[str, list[float]]


@step
def load_data(n_samples: int = 200, seed: int = 0) -> Annotated[Dataset, "dataset"]:
    """Points on the line y = 2x + 1, with a little noise."""
    rng = random.Random(seed)
    xs = [rng.uniform(-5, 5) for _ in range(n_samples)]
    ys = [2.0 * x + 1.0 + rng.gauss(0, 0.5) for x in xs]
    return {"x": xs, "y": ys}


@step
def split(
    dataset: Dataset, test_fraction: float = 0.25
) -> tuple[Annotated[Dataset, "train_set"], Annotated[Dataset, "test_set"]]:
    cut = int(len(dataset["x"]) * (1 - test_fraction))
    train = {k: v[:cut] for k, v in dataset.items()}
    test = {k: v[cut:] for k, v in dataset.items()}
    return train, test  # a tuple literal: two outputs


@step
def train(
    train_set: Dataset, learning_rate: float = 0.02, epochs: int = 200
) -> tuple[Annotated[float, "slope"], Annotated[float, "intercept"]]:
    """Plain gradient descent on the mean squared error."""
    slope = intercept = 0.0
    xs, ys = train_set["x"], train_set["y"]
    n = len(xs)
    for _ in range(epochs):
        errors = [slope * x + intercept - y for x, y in zip(xs, ys, strict=True)]
        slope -= learning_rate * 2 * sum(e * x for e, x in zip(errors, xs, strict=True)) / n
        intercept -= learning_rate * 2 * sum(errors) / n
    return slope, intercept


@step
def evaluate(test_set: Dataset, slope: float, intercept: float) -> Annotated[float, "mse"]:
    xs, ys = test_set["x"], test_set["y"]
    errors = [(slope * x + intercept - y) ** 2 for x, y in zip(xs, ys, strict=True)]
    return sum(errors) / len(errors)


@pipeline
def training_pipeline(learning_rate: float = 0.02) -> None:
    dataset = load_data()
    train_set, test_set = split(dataset)
    slope, intercept = train(train_set, learning_rate=learning_rate)
    evaluate(test_set, slope, intercept)


def show(title: str, run_name: str) -> None:
    run = Client().get_pipeline_run(run_name)  # read back from the store
    print(f"\n{title}: {run.name} -> {run.status.value.upper()}")
    for step_id, step_run in run.steps.items():
        print(f"  {step_id:<10} {step_run.status.value.upper():<10} outputs: "
              f"{', '.join(step_run.outputs)}")
    slope = run.steps["train"].outputs["slope"].load()
    intercept = run.steps["train"].outputs["intercept"].load()
    mse = run.steps["evaluate"].output.load()  # `.output`: the single output
    print(f"  model: y = {slope:.3f} * x + {intercept:.3f}   test MSE: {mse:.4f}")


def main() -> None:
    enable_console_logging()  # flowcore's own events (step started, cache hit, ...) on stderr

    first = training_pipeline()
    show("first run", first.name)

    second = training_pipeline()  # same code, same inputs: every step comes from the cache
    show("second run (cached)", second.name)

    third = training_pipeline(learning_rate=0.005)  # only train and evaluate run again
    show("third run (new learning rate)", third.name)

    runs = Client().list_pipeline_runs(pipeline_name="training_pipeline", limit=5)
    print(f"\nlatest runs of training_pipeline: {[r.name for r in runs]}")


if __name__ == "__main__":
    main()
