"""Custom invocation IDs (`step_name=`) and order-only dependencies (`after=`).

- `my_step(step_name="first_step")` gives an invocation its own ID; without one, a repeated
  step gets `name_2`, `name_3`, ... in call order.
- `step_c(after=[a, b])` waits for the invocations behind those output handles without
  taking their outputs; `step_d(after="step_c")` waits for an invocation named by its ID
  (the ID may even be declared later in the pipeline function).
- Mistakes (a duplicate ID, an unknown `after=` ID, a cycle) are `PipelineDefinitionError`s
  raised before any step runs.

Run it with:  python examples/custom_ids_and_after.py
"""

from __future__ import annotations

import asyncio
import logging

import flowcore
from flowcore import PipelineDefinitionError, Stack, enable_console_logging, pipeline, step

order: list[str] = []  # which bodies ran, in order (all steps run in this process)


@step(enable_cache=False)
async def my_step(label: str) -> str:
    order.append(label)
    return label.upper()


@step(enable_cache=False)
async def step_a() -> int:
    await asyncio.sleep(0.1)  # slow: step_c must still wait for it
    order.append("step_a")
    return 1


@step(enable_cache=False)
async def step_b() -> int:
    order.append("step_b")
    return 2


@step(enable_cache=False)
async def step_c() -> None:  # a side effect only: no inputs, no outputs
    order.append("step_c")


@step(enable_cache=False)
async def step_d() -> None:
    order.append("step_d")


@pipeline
def ids_pipeline() -> None:
    # Custom invocation IDs "first_step" and "second_step"
    my_step("one", step_name="first_step")
    my_step("two", step_name="second_step")
    my_step("three")  # the default ID: the step's name
    my_step("four")  # repeated: my_step_2


@pipeline
def order_pipeline() -> None:
    # step_d names step_c before step_c is declared: only IDs still unknown at the end fail.
    step_d(after="step_c")
    step_a_output = step_a()
    step_b_output = step_b()
    # step_c runs only after both step_a and step_b complete, though it takes no input
    step_c(after=[step_a_output, step_b_output])


@pipeline
def broken_pipeline() -> None:
    step_c(after="step_that_does_not_exist")


def main() -> None:
    enable_console_logging(logging.WARNING)
    flowcore.set_active_stack(Stack.in_memory())

    print("1) invocation IDs")
    run = ids_pipeline()
    for step_id, step_run in run.steps.items():
        print(f"  {step_id:<12} -> {step_run.output.load()}")

    print("\n2) after= by output handle and by invocation ID")
    order.clear()
    order_pipeline()
    print(f"  bodies ran in this order: {order}")
    assert order.index("step_c") > max(order.index("step_a"), order.index("step_b"))
    assert order.index("step_d") > order.index("step_c")

    print("\n3) an unknown after= ID is an error before any step runs")
    try:
        broken_pipeline()
    except PipelineDefinitionError as exc:
        print(f"  PipelineDefinitionError: {exc}")


if __name__ == "__main__":
    main()
