"""Hooks and the step context.

Shows:
- step hooks: `on_success` and `on_failure` (plus `on_start` / `on_end`), sync or async;
- parameter injection: a hook names what it wants (`step_name`, `step_output`, `status`, an
  argument annotated with an exception type, or `exception`), or takes nothing;
- pipeline-level hooks, which apply to every step unless the step has its own of that kind;
- `get_step_context()` inside a step body and inside a hook;
- a hook that raises: it is logged and recorded on the step run, the step's status is unchanged.

Run it with:  python examples/hooks_and_context.py
"""

from __future__ import annotations

import logging
from typing import Any

import flowcore
from flowcore import (
    RunFailedError,
    Stack,
    StepStatus,
    enable_console_logging,
    get_step_context,
    pipeline,
    step,
)

# -- hooks -------------------------------------------------------------------------------


def success_hook(step_name: str, step_output: Any) -> None:
    print(f"  [step on_success] {step_name} returned {step_output!r}")


def failure_hook(exception: BaseException) -> None:
    # The seed's example: the step context works inside hooks too.
    context = get_step_context()
    print(  # one print: the steps of a run (and their hooks) may run at the same time
        f"  [step on_failure] failed step: {context.step_run.name}\n"
        f"                    parameters: {context.step_run.config.parameters}\n"
        f"                    exception: {type(exception).__name__}: {exception}\n"
        f"                    pipeline run: {context.pipeline_run.name}"
    )


async def pipeline_success_hook(step_name: str) -> None:  # async hooks work too
    print(f"  [pipeline on_success] {step_name} succeeded")


def pipeline_failure_hook(error: ValueError) -> None:  # any name, annotated with the type
    print(f"  [pipeline on_failure] {get_step_context().step_run.name}: {error}")


def on_end_hook(step_name: str, status: StepStatus) -> None:
    print(f"  [pipeline on_end] {step_name} ended {status.value.upper()}")


def broken_hook() -> None:
    raise RuntimeError("the notification service is down")


# -- steps -------------------------------------------------------------------------------


@step(on_success=success_hook, on_failure=failure_hook)
def my_step(some_parameter: int = 1) -> int:
    ctx = get_step_context()
    print(f"  [body] {ctx.step_run.name} of pipeline {ctx.pipeline.name}, "
          f"attempt {ctx.step_run.attempt}, parameters {ctx.step_run.config.parameters}")
    if some_parameter < 0:
        raise ValueError(f"some_parameter must be >= 0, got {some_parameter}")
    return some_parameter * 2


@step
def plain_step(x: int) -> int:  # no hooks of its own: gets the pipeline's
    return x + 1


@step
def picky_step(x: int) -> int:
    raise ValueError(f"{x} is not good enough")


@step(on_success=broken_hook)
def step_with_broken_hook() -> str:
    return "fine"


# -- pipelines ---------------------------------------------------------------------------


@pipeline(on_success=pipeline_success_hook, on_failure=pipeline_failure_hook,
          on_end=on_end_hook, enable_cache=False)
def hooked_pipeline(value: int = 3) -> None:
    doubled = my_step(some_parameter=value)
    plain_step(doubled)


@pipeline(on_failure=pipeline_failure_hook, enable_cache=False)
def failing_pipeline() -> None:
    my_step(some_parameter=-1)  # its own on_failure replaces the pipeline's
    picky_step(5)  # no on_failure of its own: the pipeline's runs


@pipeline(enable_cache=False)
def broken_hook_pipeline() -> None:
    step_with_broken_hook()


def main() -> None:
    # WARNING keeps the output short; the failing hook below is still logged (at ERROR).
    enable_console_logging(logging.WARNING)
    flowcore.set_active_stack(Stack.in_memory())

    print("1) success: step hooks beat pipeline hooks of the same kind")
    hooked_pipeline(value=3)

    print("\n2) failure: the failure hook gets the exception and the step context")
    try:
        failing_pipeline()
    except RunFailedError as exc:
        print(f"  run {exc.run.status.value.upper()}: "
              f"{sorted(n for n, s in exc.run.steps.items() if s.status is StepStatus.FAILED)}")

    print("\n3) a hook that raises is logged (ERROR, with its traceback) and recorded;"
          " the step still COMPLETED")
    run = broken_hook_pipeline()
    step_run = run.steps["step_with_broken_hook"]
    print(f"  status {step_run.status.value.upper()}, hook errors: "
          f"{[f'{e.kind}: {e.error}' for e in step_run.hook_errors]}")


if __name__ == "__main__":
    main()
