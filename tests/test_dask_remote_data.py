"""Dask workers that move their own data (API.md §18): with an artifact store every machine
reaches (S3 here, a real moto server), a step on a Dask worker loads its inputs from the store
and stores its outputs itself; the driver passes references, not values."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _s3_server import S3, s3_bucket, s3_endpoint

from flowcore import RunFailedError, Stack, StepOutputError, pipeline, step
from flowcore.stack import DaskStepOperator

MB = 1024 * 1024
__all__ = ["s3_bucket", "s3_endpoint"]  # the S3 server's fixtures, used below


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """One real LocalCluster of 2 worker processes shared by this module's tests."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                       dashboard_address=":0")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def remote_stack(dask_cluster: Any, s3_bucket: S3, tmp_path: Path) -> Stack:
    """SQLite metadata, artifacts in the S3 bucket, and a "dask" operator on the cluster."""
    return Stack.from_urls(metadata=str(tmp_path / "db"), artifacts=s3_bucket.url(),
                           storage_options=s3_bucket.options).with_components(
        step_operators={"dask": DaskStepOperator(address=dask_cluster.scheduler_address)})


@step(step_operator="dask", enable_cache=False)
def make_big(megabytes: int) -> tuple[np.ndarray, int]:
    return np.ones(megabytes * MB // 8), os.getpid()


@step(step_operator="dask", enable_cache=False)
def total_on_worker(big: np.ndarray) -> float:
    return float(big.sum())


@step(enable_cache=False)
def length_here(big: np.ndarray) -> int:
    return len(big)


@pipeline
def worker_only(megabytes: int = 50) -> None:
    big, _ = make_big(megabytes)
    total_on_worker(big)


@pipeline
def worker_then_driver() -> None:
    big, _ = make_big(2)
    total_on_worker(big)
    length_here(big)


def test_data_stays_off_the_driver(remote_stack: Stack) -> None:
    """A 50 MB output made on a worker and consumed on a worker never passes through the
    driver: its traced memory peak stays far below the data's size, the output is an object
    in the bucket, and the consumer got the right value."""
    worker_only.with_options(stack=remote_stack)(megabytes=1)  # warm up: imports, connections
    tracemalloc.start()
    try:
        run = worker_only.with_options(stack=remote_stack)()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert run.steps["total_on_worker"].output.load() == 50 * MB // 8
    assert run.steps["make_big"].outputs["output_1"].load() != os.getpid()
    assert run.steps["make_big"].outputs["output_0"].uri.startswith("s3://")
    assert peak < 20 * MB, f"the driver's traced peak was {peak / MB:.1f} MB"


def test_a_consumer_on_the_driver_loads_what_a_worker_stored(remote_stack: Stack) -> None:
    """A local step downstream of a worker's output gets the value, loaded from the store;
    the run's artifacts load on the driver too."""
    run = worker_then_driver.with_options(stack=remote_stack)()
    assert run.steps["length_here"].output.load() == 2 * MB // 8
    assert run.steps["total_on_worker"].output.load() == 2 * MB // 8
    assert run.steps["make_big"].outputs["output_0"].load().shape == (2 * MB // 8,)


@step(step_operator="dask", enable_cache=False)
def part(i: int) -> list[int]:
    return [i] * 3


@step(step_operator="dask", enable_cache=False)
def gather(parts: list[list[int]]) -> int:
    return sum(sum(p) for p in parts)


seen_by_hook: list[Any] = []


def remember_output(step_output: Any) -> None:
    seen_by_hook.append(step_output)


@step(step_operator="dask", enable_cache=False, on_success=remember_output)
def hooked(n: int) -> dict[str, int]:
    return {"n": n}


@pipeline
def fan_in() -> None:
    gather([part(i) for i in range(4)])
    hooked(7)


def test_fan_in_of_references_and_hooks_see_values(remote_stack: Stack) -> None:
    """A list of upstream handles reaches a worker as references it loads itself; a success
    hook on the driver receives the loaded output, not a reference."""
    seen_by_hook.clear()
    run = fan_in.with_options(stack=remote_stack)()
    assert run.steps["gather"].output.load() == 3 * (0 + 1 + 2 + 3)
    assert seen_by_hook == [{"n": 7}]


@step(step_operator="dask", enable_cache=False)
def wrong_type() -> int:
    return "not a number"  # type: ignore[return-value]


@pipeline
def bad_output() -> None:
    wrong_type()


def test_an_output_of_the_wrong_type_fails_the_step_on_the_worker(remote_stack: Stack) -> None:
    """Outputs are checked where they are stored: a wrong type is the step's StepOutputError."""
    with pytest.raises(RunFailedError) as info:
        bad_output.with_options(stack=remote_stack)()
    assert isinstance(info.value.__cause__, StepOutputError)
    error = info.value.run.steps["wrong_type"].error
    assert error is not None and error.type == StepOutputError.__name__
    assert "wrong_type" in error.message


def test_a_single_step_on_a_worker_returns_its_value(remote_stack: Stack) -> None:
    """Calling a Dask step outside a pipeline returns the value (loaded from the store)."""
    import flowcore

    flowcore.set_active_stack(remote_stack)
    value, pid = make_big(1)
    assert value.shape == (MB // 8,) and pid != os.getpid()
