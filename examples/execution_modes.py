"""Execution modes: what happens to the rest of a run when one step fails.

The graph is the one from the ZenML guide: 1 -> {2, 3, 4}; 2 -> 5; 3 -> 6; 4 -> 7;
{5, 6, 7} -> 8. Step 2 fails while steps 3 and 4 are still running. The same graph runs in
each of the three modes and the example prints every step's status:

- FAIL_FAST: 3 and 4 are cancelled at once (STOPPED); nothing else starts.
- STOP_ON_FAILURE: 3 and 4 finish (COMPLETED); nothing new starts.
- CONTINUE_ON_FAILURE (the default): everything not downstream of step 2 still runs.

Run it with:  python examples/execution_modes.py
"""

from __future__ import annotations

import asyncio
import logging

import flowcore
from flowcore import ExecutionMode, RunFailedError, Stack, enable_console_logging, pipeline, step


@step(enable_cache=False)
async def step_1() -> int:
    return 1


@step(enable_cache=False)
async def step_2(x: int) -> int:
    await asyncio.sleep(0.05)
    raise RuntimeError("step 2 broke")


@step(enable_cache=False)
async def slow_step(x: int) -> int:
    # Steps 3 and 4: still running when step 2 fails.
    await asyncio.sleep(0.3)
    return x + 1


@step(enable_cache=False)
async def passthrough(x: int) -> int:
    return x


@step(enable_cache=False)
async def step_8(a: int, b: int, c: int) -> int:
    return a + b + c


@pipeline
def eight_steps() -> None:
    one = step_1()
    two = step_2(one)
    three = slow_step(one, step_name="step_3")
    four = slow_step(one, step_name="step_4")
    five = passthrough(two, step_name="step_5")
    six = passthrough(three, step_name="step_6")
    seven = passthrough(four, step_name="step_7")
    step_8(five, six, seven)


def main() -> None:
    # Step failures are logged at ERROR; INFO would add every step's start and end.
    enable_console_logging(logging.WARNING)
    flowcore.set_active_stack(Stack.in_memory())

    for mode in ExecutionMode:
        try:
            eight_steps.with_options(execution_mode=mode)()
        except RunFailedError as exc:
            run = exc.run  # the PipelineRun, with every step's final status
            print(f"\n{mode.name}: run {run.status.value.upper()} "
                  f"(first error: {exc.__cause__!r})")
            for name, step_run in run.steps.items():
                print(f"  {name:<8} {step_run.status.value.upper()}")


if __name__ == "__main__":
    main()
