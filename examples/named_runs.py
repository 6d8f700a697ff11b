"""Named pipeline runs: run-name templates and substitutions.

- The default name is `{pipeline_name}-{date}-{time}` (UTC; `{time}` has microseconds, so
  two runs in the same second still get different names).
- `with_options(run_name=...)` takes a template with `{date}` (`%Y_%m_%d`), `{time}`
  (`%H_%M_%S_%f`), `{pipeline_name}`, `{run_id}` and any placeholder you supply with
  `with_options(substitutions={...})`.
- Names are unique: reusing one raises `RunNameConflictError` before any step runs, and an
  unknown placeholder is a `ConfigError`.
- `Client().get_pipeline_run(name)` finds a run by its name.

Run it with:  python examples/named_runs.py
"""

from __future__ import annotations

import logging

import flowcore
from flowcore import Client, ConfigError, RunNameConflictError, Stack, enable_console_logging, pipeline, step


@step
def say_hello(who: str) -> str:
    return f"hello, {who}"


@pipeline
def greeting_pipeline(who: str = "world") -> None:
    say_hello(who)


def main() -> None:
    enable_console_logging(logging.WARNING)
    flowcore.set_active_stack(Stack.in_memory())

    default = greeting_pipeline()
    print(f"default name:      {default.name}")

    nightly = greeting_pipeline.with_options(run_name="nightly_{date}_{time}")()
    print(f"date and time:     {nightly.name}")

    by_id = greeting_pipeline.with_options(run_name="{pipeline_name}-{run_id}")()
    print(f"pipeline and id:   {by_id.name} (id {by_id.id})")

    custom = greeting_pipeline.with_options(
        run_name="{team}-{experiment}-{date}",
        substitutions={"team": "vision", "experiment": "resnet50"},
    )
    first = custom(who="team")
    print(f"substitutions:     {first.name}")

    print("\nthe same name twice:")
    release = greeting_pipeline.with_options(run_name="release-1.0")
    release()
    try:
        release()
    except RunNameConflictError as exc:
        print(f"  RunNameConflictError: {exc}")

    print("an unknown placeholder:")
    try:
        greeting_pipeline.with_options(run_name="run-{colour}")()
    except ConfigError as exc:
        print(f"  ConfigError: {exc}")

    found = Client().get_pipeline_run(first.name)
    print(f"\nClient().get_pipeline_run({first.name!r}) -> {found.status.value.upper()}, "
          f"say_hello returned {found.steps['say_hello'].output.load()!r}")


if __name__ == "__main__":
    main()
