"""Configuring a run with a YAML file (`with_options(config_path=...)`).

The example writes `run_config.yaml` to a temporary directory and runs a training pipeline
with it. The file sets:

- `run_name` (with placeholders), `enable_cache` and `execution_mode` (the enum's value:
  `fail_fast`, `stop_on_failure` or `continue_on_failure`),
- `parameters`: the pipeline function's parameters,
- `settings`: settings for every step (here the orchestrator's),
- `steps: {<invocation ID>: {...}}`: per-invocation `enable_cache`, `parameters`, `retry` and
  `settings` (and `step_operator`).

Precedence is decorator < `configure()` < YAML < `with_options()` keywords, so a keyword passed
next to `config_path` still wins. An unknown key in the file is a `ConfigError` naming the key
and the file.

Run it with:  python examples/yaml_config.py
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import flowcore
from flowcore import ConfigError, Stack, get_step_context, pipeline, step

RUN_CONFIG = """\
run_name: "nightly_{date}_{run_id}"
enable_cache: false
execution_mode: continue_on_failure
parameters:
  dataset_size: 200
settings:
  orchestrator: {synchronous: true}   # a plain call blocks until the run ends
steps:
  load_data:
    enable_cache: true
  train_model:
    parameters: {learning_rate: 0.05, epochs: 4}
    retry: {max_retries: 2, delay: 0}
"""


@step
def load_data(dataset_size: int) -> list[float]:
    return [i / dataset_size for i in range(dataset_size)]


@step
def train_model(data: list[float], learning_rate: float = 0.1, epochs: int = 1) -> float:
    attempt = get_step_context().step_run.attempt
    if attempt == 1:
        # A transient failure: the retry configured in the YAML file absorbs it.
        raise ConnectionError("feature store briefly unavailable")
    return round(sum(data) / len(data) * learning_rate * epochs, 4)


@step
def report(score: float) -> str:
    return f"score={score}"


@pipeline(enable_cache=True)
def training(dataset_size: int = 10) -> None:
    report(train_model(load_data(dataset_size)))


def describe(run: flowcore.PipelineRun) -> None:
    print(f"  run name: {run.name}")
    for name, sr in run.steps.items():
        print(f"  {name:12} {sr.status.value.upper():10} attempts={sr.attempts} "
              f"parameters={sr.config.parameters}")
    print(f"  report: {run.steps['report'].output.load()}")


def main() -> None:
    flowcore.enable_console_logging(logging.WARNING)
    flowcore.set_active_stack(Stack.in_memory())
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "run_config.yaml"
        config.write_text(RUN_CONFIG)
        print(f"--- {config.name} ---\n{RUN_CONFIG}---")

        print("1) a run configured by the YAML file")
        describe(training.with_options(config_path=config)())

        print("\n2) again: load_data is cached (steps.load_data.enable_cache), the rest is not")
        describe(training.with_options(config_path=config)())

        print("\n3) with_options() keywords beat the file: run_name given next to config_path")
        run = training.with_options(config_path=config, run_name="manual_{run_id}")()
        print(f"  run name: {run.name}")

        print("\n4) an unknown key is a ConfigError naming the key and the file")
        bad = Path(tmp) / "typo.yaml"
        bad.write_text("enable_caching: false\n")
        try:
            training.with_options(config_path=bad)()
        except ConfigError as exc:
            print(f"  ConfigError: {exc}")


if __name__ == "__main__":
    main()
