"""Retries: `StepRetryConfig` re-runs a step that fails with a transient error.

Part 1 runs a flaky step that fails twice and then succeeds, with short real delays
(0.05 s, then 0.1 s), and prints how many attempts it took.

Part 2 shows the schedule from the ZenML guide (max_retries=3, delay=10, backoff=2: wait 10 s,
20 s, 40 s, then fail) without waiting 70 seconds: `flowcore.testing.FakeClock` replaces the
run's clock, records every delay and returns at once.

Run it with:  python examples/retries.py
"""

from __future__ import annotations

import logging

import flowcore
from flowcore import (
    RunFailedError,
    Stack,
    StepRetryConfig,
    enable_console_logging,
    get_step_context,
    pipeline,
    step,
)
from flowcore.testing import FakeClock


class TransientError(Exception):
    """Something that usually goes away if you try again (a timeout, a 503, ...)."""


@step(
    enable_cache=False,
    retry=StepRetryConfig(max_retries=3, delay=0.05, backoff=2, retry_on=(TransientError,)),
)
def fetch_prices() -> list[float]:
    attempt = get_step_context().step_run.attempt  # counts from 1
    print(f"  fetch_prices: attempt {attempt}")
    if attempt < 3:
        raise TransientError(f"service unavailable (attempt {attempt})")
    return [101.5, 99.0, 103.25]


@step(enable_cache=False)
def average(prices: list[float]) -> float:
    return sum(prices) / len(prices)


@pipeline
def prices_pipeline() -> None:
    average(fetch_prices())


@step(enable_cache=False, retry=StepRetryConfig(max_retries=3, delay=10, backoff=2))
def always_down() -> int:
    raise TransientError("still down")


@pipeline
def doomed_pipeline() -> None:
    always_down()


def main() -> None:
    # INFO shows a `step_retrying` line with the delay for every retry.
    enable_console_logging(logging.INFO)
    flowcore.set_active_stack(Stack.in_memory())

    print("1) a flaky step that succeeds on its third attempt")
    run = prices_pipeline()
    fetch = run.steps["fetch_prices"]
    print(f"  fetch_prices {fetch.status.value.upper()} after {fetch.attempts} attempts; "
          f"average price = {run.steps['average'].output.load():.2f}")

    print("\n2) 3 retries, delay 10 s, backoff 2, on a fake clock (no real waiting)")
    clock = FakeClock()
    try:
        doomed_pipeline.with_options(clock=clock)()
    except RunFailedError as exc:
        step_run = exc.run.steps["always_down"]
        print(f"  always_down {step_run.status.value.upper()} after {step_run.attempts} attempts "
              f"({step_run.error})")
    print(f"  delays before each retry: {clock.sleeps}")  # [10.0, 20.0, 40.0]
    print(f"  virtual time spent waiting: {clock.now:.0f} s")
    assert clock.sleeps == [10.0, 20.0, 40.0]


if __name__ == "__main__":
    main()
