"""Step operators (API.md section 9): ProcessStepOperator runs step bodies in worker processes
and DaskStepOperator on a real Dask LocalCluster; crashes, retries, cancellation and settings."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowcore import (
    ConfigError,
    ExecutionMode,
    RunFailedError,
    RunStatus,
    Stack,
    StepRetryConfig,
    StepStatus,
    StepTimeoutError,
    pipeline,
    step,
)
from flowcore.stack import DaskStepOperator, ProcessStepOperator, StepOperatorError

# -- helpers -------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until_dead(pid: int, timeout: float = 10.0) -> bool:
    """Poll until `pid` is gone; True if it died within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def wait_for_file(path: Path, timeout: float = 30.0) -> str:
    """Poll until `path` exists and has content; return its text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if text:
                return text
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear within {timeout} s")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, delta in events:
        now += delta
        best = max(best, now)
    return best


def process_stack(max_workers: int = 2) -> Stack:
    """An in-memory stack with a process step operator named "proc"."""
    return Stack.in_memory().with_components(
        step_operators={"proc": ProcessStepOperator(max_workers=max_workers)})


class Payload:
    """A user-defined class that travels to and from the worker by cloudpickle."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values


# -- ProcessStepOperator ---------------------------------------------------------------------


@step(enable_cache=False)
def make_payload(n: int) -> Payload:
    return Payload(np.arange(n, dtype=np.float64))


@step(step_operator="proc", enable_cache=False)
def sync_remote(payload: Payload, factor: float) -> tuple[int, Payload]:
    return os.getpid(), Payload(payload.values * factor)


@step(step_operator="proc", enable_cache=False)
async def async_remote(payload: Payload) -> tuple[int, float]:
    await asyncio.sleep(0.01)
    return os.getpid(), float(payload.values.sum())


@step(enable_cache=False)
def local_total(remote: Payload) -> float:
    return float(remote.values.sum())


@pipeline
def remote_pipeline(n: int = 5) -> None:
    payload = make_payload(n)
    _, scaled = sync_remote(payload, factor=2.0)
    async_remote(payload)
    local_total(scaled)


def test_process_operator_runs_sync_and_async_bodies_in_another_process() -> None:
    """A sync and an async step body run in a worker process (another pid); a user object with a
    numpy array goes in and comes back out by cloudpickle and flows to a local step."""
    run = remote_pipeline.with_options(stack=process_stack())(n=5)
    assert run.status is RunStatus.COMPLETED
    sync_outputs = run.steps["sync_remote"].outputs
    sync_pid, scaled = sync_outputs["output_0"].load(), sync_outputs["output_1"].load()
    async_outputs = run.steps["async_remote"].outputs
    async_pid, total = async_outputs["output_0"].load(), async_outputs["output_1"].load()
    assert sync_pid != os.getpid() and async_pid != os.getpid()
    assert isinstance(scaled, Payload)
    np.testing.assert_array_equal(scaled.values, np.arange(5) * 2.0)
    assert total == 10.0
    assert run.steps["local_total"].output.load() == 20.0


async def test_process_operator_from_an_event_loop() -> None:
    """`await p.run()` with a process operator works too, and `await stack.close()` lets the idle
    worker processes exit."""
    stack = process_stack()
    run = await remote_pipeline.with_options(stack=stack).run(n=3)
    pid = run.steps["sync_remote"].outputs["output_0"].load()
    assert pid != os.getpid() and pid_alive(pid)
    await stack.close()
    assert await asyncio.to_thread(wait_until_dead, pid)


def test_step_error_in_worker_is_the_step_error() -> None:
    """An exception raised in the worker fails the step with that exception type and message
    (it is the RunFailedError's cause)."""

    @step(step_operator="proc", enable_cache=False)
    def raises_in_worker() -> int:
        raise ValueError(f"bad value in {os.getpid()}")

    @pipeline
    def remote_error() -> None:
        raises_in_worker()

    with pytest.raises(RunFailedError) as info:
        remote_error.with_options(stack=process_stack())()
    assert isinstance(info.value.__cause__, ValueError)
    assert "bad value in" in str(info.value.__cause__)
    run = info.value.run
    assert run is not None and run.steps["raises_in_worker"].error is not None
    assert run.steps["raises_in_worker"].error.type == "ValueError"


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_dying_worker_fails_the_step_with_a_clear_error(how: str) -> None:
    """A worker that dies mid-step (os._exit(1) or SIGKILL) fails the step with a
    StepOperatorError that says the worker died, and the run ends FAILED."""

    @step(step_operator="proc", enable_cache=False)
    def dies(how: str) -> int:
        if how == "exit":
            os._exit(1)
        os.kill(os.getpid(), 9)
        return 0

    @pipeline
    def crashing(how: str) -> None:
        dies(how)

    started = time.monotonic()
    with pytest.raises(RunFailedError) as info:
        crashing.with_options(stack=process_stack())(how=how)
    assert time.monotonic() - started < 30
    cause = info.value.__cause__
    assert isinstance(cause, StepOperatorError)
    assert "died" in str(cause) and "worker process" in str(cause)
    run = info.value.run
    assert run is not None and run.status is RunStatus.FAILED
    assert run.steps["dies"].status is StepStatus.FAILED
    assert run.steps["dies"].error is not None
    assert run.steps["dies"].error.type == "StepOperatorError"


def test_retry_on_a_fresh_worker_absorbs_a_crash(tmp_path: Path) -> None:
    """A worker that dies on attempt 1 is replaced: attempt 2 runs in a new process and succeeds,
    and the operator stays usable for later steps."""
    marker = tmp_path / "crashed_once"

    @step(step_operator="proc", enable_cache=False, retry=StepRetryConfig(max_retries=1))
    def crashes_once(marker: str) -> int:
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return os.getpid()

    @step(step_operator="proc", enable_cache=False)
    def afterwards(x: int) -> int:
        return x + 1

    @pipeline
    def absorbing(marker: str) -> None:
        afterwards(crashes_once(marker))

    run = absorbing.with_options(stack=process_stack(max_workers=1))(marker=str(marker))
    assert run.status is RunStatus.COMPLETED
    sr = run.steps["crashes_once"]
    assert sr.attempts == 2
    dead_pid = int(marker.read_text())
    good_pid = sr.output.load()
    assert good_pid != dead_pid and good_pid != os.getpid()
    assert run.steps["afterwards"].output.load() == good_pid + 1


def test_fail_fast_kills_the_running_worker_process(tmp_path: Path) -> None:
    """Under FAIL_FAST a failing sibling cancels a step sleeping 60 s in a worker: the step is
    STOPPED, the run returns at once and the worker process is gone soon after."""
    pid_file = tmp_path / "sleeper.pid"

    @step(step_operator="proc", enable_cache=False)
    def sleeps_remotely(pid_file: str) -> int:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
        return 1

    @step(enable_cache=False)
    def fails_when_sleeper_runs(pid_file: str) -> int:
        wait_for_file(Path(pid_file))
        raise RuntimeError("sibling failed")

    @pipeline(execution_mode=ExecutionMode.FAIL_FAST)
    def fail_fast_remote(pid_file: str) -> None:
        sleeps_remotely(pid_file)
        fails_when_sleeper_runs(pid_file)

    started = time.monotonic()
    with pytest.raises(RunFailedError) as info:
        fail_fast_remote.with_options(stack=process_stack())(pid_file=str(pid_file))
    assert time.monotonic() - started < 30
    run = info.value.run
    assert run is not None
    assert run.steps["sleeps_remotely"].status is StepStatus.STOPPED
    assert run.steps["fails_when_sleeper_runs"].status is StepStatus.FAILED
    worker_pid = int(pid_file.read_text())
    assert worker_pid != os.getpid()
    assert wait_until_dead(worker_pid, timeout=10)


def test_timeout_kills_the_worker_process(tmp_path: Path) -> None:
    """A step timeout on a process operator fails the step with StepTimeoutError and kills the
    worker that ran the body."""
    pid_file = tmp_path / "slow.pid"

    @step(step_operator="proc", enable_cache=False, timeout=3.0)
    def too_slow(pid_file: str) -> int:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
        return 1

    @step(step_operator="proc", enable_cache=False)
    def warm_up() -> int:
        return os.getpid()

    @pipeline
    def timing_out(pid_file: str) -> None:
        # The worker is started (which takes a while on a loaded machine) before the timed
        # step, so the timeout measures the body, not the start-up.
        too_slow(pid_file, after=[warm_up()])

    started = time.monotonic()
    with pytest.raises(RunFailedError) as info:
        timing_out.with_options(stack=process_stack(max_workers=1))(pid_file=str(pid_file))
    assert time.monotonic() - started < 30
    assert isinstance(info.value.__cause__, StepTimeoutError)
    assert wait_until_dead(int(wait_for_file(pid_file, 5)), timeout=10)


async def test_cancelling_the_caller_kills_the_worker_process(tmp_path: Path) -> None:
    """Cancelling the task that awaits `p.run()` while a sync body sleeps in a worker process
    returns at once and kills that process (the body is stopped, not abandoned)."""
    pid_file = tmp_path / "cancelled.pid"

    @step(step_operator="proc", enable_cache=False)
    def sleeps_until_killed(pid_file: str) -> int:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
        return 1

    @pipeline
    def cancelled_remote(pid_file: str) -> None:
        sleeps_until_killed(pid_file)

    stack = process_stack(max_workers=1)
    running = asyncio.create_task(
        cancelled_remote.with_options(stack=stack).run(pid_file=str(pid_file)))
    worker_pid = int(await asyncio.to_thread(wait_for_file, pid_file, 60))
    started = time.monotonic()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert time.monotonic() - started < 10
    assert worker_pid != os.getpid()
    assert await asyncio.to_thread(wait_until_dead, worker_pid, 10)
    await stack.close()


def test_max_workers_bounds_concurrent_bodies() -> None:
    """With max_workers=2, five independent 0.6 s bodies run at most two at a time, in at most
    two worker processes (and at least two run together)."""

    @step(step_operator="proc", enable_cache=False)
    def timed(i: int) -> tuple[int, float, float]:
        start = time.time()
        time.sleep(0.6)
        return os.getpid(), start, time.time()

    @pipeline
    def five_wide() -> None:
        for i in range(5):
            timed(i)

    run = five_wide.with_options(stack=process_stack(max_workers=2))()
    results = [run.steps[name].outputs for name in run.steps]
    loaded = [(o["output_0"].load(), o["output_1"].load(), o["output_2"].load())
              for o in results]
    pids = {pid for pid, _, _ in loaded}
    assert os.getpid() not in pids
    assert len(pids) <= 2
    assert max_overlap([(s, e) for _, s, e in loaded]) == 2


def test_unpicklable_input_is_a_clear_error() -> None:
    """An input cloudpickle cannot send to the worker (a lock) fails the step with a
    StepOperatorError that says so."""
    import threading

    @step(step_operator="proc", enable_cache=False)
    def remote_consumer(thing: Any) -> int:
        return 1

    @pipeline
    def unpicklable() -> None:
        remote_consumer(threading.Lock())

    with pytest.raises(RunFailedError) as info:
        unpicklable.with_options(stack=process_stack())()
    cause = info.value.__cause__
    assert isinstance(cause, StepOperatorError)
    assert "cannot send" in str(cause)


# -- DaskStepOperator --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    """One real LocalCluster (2 worker processes, 1 thread each, each with 2 units of resource
    "GPU") shared by this module's Dask tests."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                       dashboard_address=":0", resources={"GPU": 2})
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def dask_stack(dask_cluster: Any) -> Stack:
    """An in-memory stack whose step operator "dask" is connected to the module's cluster."""
    return Stack.in_memory().with_components(
        step_operators={"dask": DaskStepOperator(address=dask_cluster.scheduler_address)})


def scheduler_tasks(cluster: Any) -> dict[str, str]:
    """The tasks the cluster's scheduler knows about, with their states."""
    import distributed

    with distributed.Client(cluster.scheduler_address, timeout=10) as client:
        return client.run_on_scheduler(  # type: ignore[no-any-return]
            lambda dask_scheduler: {str(k): ts.state for k, ts in dask_scheduler.tasks.items()})


@step(step_operator="dask", enable_cache=False)
def on_dask(values: list[int]) -> tuple[int, int]:
    return os.getpid(), sum(values)


@step(step_operator="dask", enable_cache=False)
async def on_dask_async(x: int) -> tuple[int, int]:
    await asyncio.sleep(0.01)
    return os.getpid(), x * 10


@step(enable_cache=False)
def numbers() -> list[int]:
    return [1, 2, 3, 4]


@pipeline
def dask_pipeline() -> None:
    _, total = on_dask(numbers())
    on_dask_async(total)


def test_dask_operator_runs_steps_on_cluster_workers(dask_stack: Stack) -> None:
    """Sync and async step bodies run on Dask worker processes (other pids) and their results
    come back and flow downstream."""
    run = dask_pipeline.with_options(stack=dask_stack)()
    assert run.status is RunStatus.COMPLETED
    pid, total = (run.steps["on_dask"].outputs[n].load() for n in ("output_0", "output_1"))
    pid2, tenfold = (run.steps["on_dask_async"].outputs[n].load() for n in ("output_0", "output_1"))
    assert pid != os.getpid() and pid2 != os.getpid()
    assert total == 10 and tenfold == 100


async def test_dask_operator_from_an_event_loop(dask_stack: Stack) -> None:
    """`await p.run()` on the test's loop uses an asynchronous Dask client; `await stack.close()`
    closes it."""
    run = await dask_pipeline.with_options(stack=dask_stack).run()
    assert run.steps["on_dask_async"].outputs["output_1"].load() == 100
    await dask_stack.close()


def test_dask_error_in_body_is_the_step_error(dask_stack: Stack) -> None:
    """An exception in a body on a Dask worker fails the step with that exception."""

    @step(step_operator="dask", enable_cache=False)
    def fails_on_dask() -> int:
        raise KeyError("missing on worker")

    @pipeline
    def dask_failure() -> None:
        fails_on_dask()

    with pytest.raises(RunFailedError) as info:
        dask_failure.with_options(stack=dask_stack)()
    assert isinstance(info.value.__cause__, KeyError)


def test_dask_resources_setting_is_accepted_and_honoured(dask_stack: Stack) -> None:
    """`"step_operator.dask": {"resources": {"GPU": 1}}` is accepted and the step runs on a worker
    offering it; asking for more than any worker has leaves the task unscheduled (the step
    times out)."""

    @step(step_operator="dask", enable_cache=False,
          settings={"step_operator.dask": {"resources": {"GPU": 1}, "priority": 5}})
    def needs_gpu() -> int:
        return os.getpid()

    @step(step_operator="dask", enable_cache=False, timeout=2.0,
          settings={"step_operator.dask": {"resources": {"GPU": 64}}})
    def needs_many_gpus() -> int:
        return os.getpid()

    @pipeline
    def gpu_pipeline() -> None:
        needs_gpu()
        needs_many_gpus()

    with pytest.raises(RunFailedError) as info:
        gpu_pipeline.with_options(stack=dask_stack)()
    run = info.value.run
    assert run is not None
    assert run.steps["needs_gpu"].status is StepStatus.COMPLETED
    assert run.steps["needs_gpu"].output.load() != os.getpid()
    assert run.steps["needs_many_gpus"].status is StepStatus.FAILED
    assert isinstance(info.value.__cause__, StepTimeoutError)


@pytest.mark.parametrize(
    ("key", "value"),
    [("step_operator.dask", {"resources": {"GPU": "lots"}}),
     ("step_operator", {"resources": ["GPU"]}),
     ("step_operator.dask", {"workers": ["tcp://x"]})],
    ids=["resource-not-number", "resources-not-mapping", "unknown-key"],
)
def test_dask_bad_settings_are_rejected(dask_stack: Stack, key: str, value: Any) -> None:
    """Dask settings that do not fit the Dask settings model are a ConfigError naming the step and
    key, before anything is sent to the cluster."""
    calls: list[int] = []

    @step(step_operator="dask", enable_cache=False, settings={key: value})
    def badly_set() -> int:
        calls.append(1)
        return 1

    @pipeline
    def bad_dask_settings() -> None:
        badly_set()

    with pytest.raises(ConfigError) as info:
        bad_dask_settings.with_options(stack=dask_stack)()
    assert "badly_set" in str(info.value) and key in str(info.value)
    assert calls == []


async def test_dask_operator_without_address_starts_and_stops_a_local_cluster() -> None:
    """DaskStepOperator() with no address starts its own LocalCluster on first use; `await
    stack.close()` shuts it down (its worker process exits)."""
    pytest.importorskip("distributed")
    stack = Stack.in_memory().with_components(
        step_operators={"dask": DaskStepOperator(n_workers=1, processes=True)})
    try:
        run = await dask_pipeline.with_options(stack=stack).run()
        worker_pid = run.steps["on_dask"].outputs["output_0"].load()
        assert worker_pid != os.getpid() and pid_alive(worker_pid)
    finally:
        await stack.close()
    assert await asyncio.to_thread(wait_until_dead, worker_pid, 20)


def test_dask_fail_fast_cancels_the_dask_future(
    dask_cluster: Any, dask_stack: Stack, tmp_path: Path,
) -> None:
    """Under FAIL_FAST, a failing local step cancels a long step running on Dask: the step is
    STOPPED, the run returns long before the body would end, and the scheduler forgets the task
    (its future was cancelled)."""
    started_file = tmp_path / "dask_started"

    @step(step_operator="dask", enable_cache=False)
    def long_on_dask(marker: str) -> int:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(20)
        return 1

    @step(enable_cache=False)
    def fails_once_dask_runs(marker: str) -> int:
        wait_for_file(Path(marker))
        raise RuntimeError("local failure")

    @pipeline(execution_mode=ExecutionMode.FAIL_FAST)
    def dask_fail_fast(marker: str) -> None:
        long_on_dask(marker)
        fails_once_dask_runs(marker)

    started = time.monotonic()
    with pytest.raises(RunFailedError) as info:
        dask_fail_fast.with_options(stack=dask_stack)(marker=str(started_file))
    assert time.monotonic() - started < 15
    run = info.value.run
    assert run is not None
    assert run.steps["long_on_dask"].status is StepStatus.STOPPED
    deadline = time.monotonic() + 10
    tasks = scheduler_tasks(dask_cluster)
    while tasks and time.monotonic() < deadline:
        time.sleep(0.1)
        tasks = scheduler_tasks(dask_cluster)
    assert tasks == {}


@step(step_operator="dask", enable_cache=False)
def dask_square_or_fail(i: int) -> int:
    if i % 7 == 3:
        raise ValueError(f"element {i} refuses")
    time.sleep(0.001 * (i % 5))
    return i * i


@pipeline
def dask_many() -> None:
    for i in range(40):
        dask_square_or_fail(i, step_name=f"sq{i}")


def test_dask_results_fetched_in_batches_reach_their_own_steps(dask_stack: Stack) -> None:
    """Forty concurrent Dask steps (their results fetched in shared batches, the function sent
    to the workers once) each get their own value, and the failing ones their own error."""
    with pytest.raises(RunFailedError) as info:
        dask_many.with_options(stack=dask_stack)()
    run = info.value.run
    assert run is not None
    for i in range(40):
        sr = run.steps[f"sq{i}"]
        if i % 7 == 3:
            assert sr.status is StepStatus.FAILED
            assert sr.error is not None and f"element {i} refuses" in sr.error.message
        else:
            assert sr.status is StepStatus.COMPLETED and sr.output.load() == i * i


def note(where: str, name: str, text: str) -> None:
    """Write a small marker file `name` in directory `where` (what a body did, for the test)."""
    Path(where, name).write_text(text)


def dask_call_tasks(cluster: Any) -> dict[str, str]:
    """The scheduler's step tasks (flowcore's `_dask_call` submissions) with their states."""
    return {k: v for k, v in scheduler_tasks(cluster).items() if k.startswith("_dask_call")}


def test_dask_cancelled_step_that_had_not_started_never_runs(
    dask_cluster: Any, dask_stack: Stack, tmp_path: Path,
) -> None:
    """A Dask step waiting behind two busy workers when FAIL_FAST stops the run is STOPPED and
    its body never runs, even once the workers are free; the sync bodies that were running are
    not interrupted and run on to their end."""
    release, ran = tmp_path / "release", tmp_path / "ran"

    @step(step_operator="dask", enable_cache=False)
    def holds_a_worker(i: int, release: str, where: str) -> int:
        Path(where, f"started-{i}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 40
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)
        Path(where, f"ended-{i}").write_text(str(os.getpid()))
        return i

    @step(enable_cache=False)
    def both_workers_busy(where: str) -> int:
        wait_for_file(Path(where, "started-0"))
        wait_for_file(Path(where, "started-1"))
        return 1

    @step(step_operator="dask", enable_cache=False)
    def queued_on_dask(ran: str, gate: int) -> int:
        with open(ran, "a") as f:
            f.write("ran\n")
        return gate

    @step(enable_cache=False)
    def fails_once_queued(gate: int) -> int:
        # Fail only once the queued step is on the scheduler, behind the two held workers.
        deadline = time.monotonic() + 20
        while len(dask_call_tasks(dask_cluster)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        raise RuntimeError(f"failing with {len(dask_call_tasks(dask_cluster))} Dask tasks")

    @pipeline(execution_mode=ExecutionMode.FAIL_FAST)
    def saturated(release: str, ran: str, where: str) -> None:
        holds_a_worker(0, release, where)
        holds_a_worker(1, release, where)
        gate = both_workers_busy(where)
        queued_on_dask(ran, gate)
        fails_once_queued(gate)

    try:
        with pytest.raises(RunFailedError) as info:
            saturated.with_options(stack=dask_stack)(
                release=str(release), ran=str(ran), where=str(tmp_path))
    finally:
        release.write_text("go")
    run = info.value.run
    assert run is not None
    assert run.steps["fails_once_queued"].error is not None
    assert "with 3 Dask tasks" in run.steps["fails_once_queued"].error.message
    assert run.steps["queued_on_dask"].status is StepStatus.STOPPED
    assert run.steps["holds_a_worker"].status is StepStatus.STOPPED
    assert run.steps["holds_a_worker_2"].status is StepStatus.STOPPED
    # The held workers were not interrupted: their bodies end after the run, once released,
    # and only then would a thread be free for the cancelled step.
    wait_for_file(tmp_path / "ended-0")
    wait_for_file(tmp_path / "ended-1")
    deadline = time.monotonic() + 10
    while dask_call_tasks(dask_cluster) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    assert not ran.exists()


def test_dask_wrapper_skips_the_body_of_a_task_cancelled_before_it_began(
    dask_cluster: Any, tmp_path: Path,
) -> None:
    """When a task's cancellation reaches its worker after a thread picked the task up but
    before the step body began (a race Dask alone does not close), flowcore's wrapper does not
    start the body."""
    import distributed

    from flowcore.stack._operators import _dask_call

    ran, picked_up = tmp_path / "ran", tmp_path / "picked_up"

    def body(path: str) -> int:
        note(str(Path(path).parent), Path(path).name, "ran")
        return 1

    def picked_up_late(ran: str, picked_up: str) -> Any:
        # Holds the task in its thread until the worker has marked it cancelled, then hands
        # it to the wrapper as if the thread had only now reached it.
        worker = distributed.get_worker()
        key = distributed.utils.thread_state.key
        note(str(Path(picked_up).parent), Path(picked_up).name, "yes")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            task = worker.state.tasks.get(key)
            if task is None or task.state == "cancelled":
                break
            time.sleep(0.01)
        return _dask_call(body, {"path": ran}, False)

    with distributed.Client(dask_cluster.scheduler_address, timeout=10) as client:
        future = client.submit(picked_up_late, str(ran), str(picked_up), pure=False)
        wait_for_file(picked_up)
        client.cancel(future, force=True)
    deadline = time.monotonic() + 20
    while any(k.startswith("picked_up_late") for k in scheduler_tasks(dask_cluster)) and (
            time.monotonic() < deadline):
        time.sleep(0.1)
    time.sleep(0.5)
    assert not ran.exists()


def test_dask_cancelled_async_body_is_cancelled_on_the_worker(
    dask_cluster: Any, dask_stack: Stack, tmp_path: Path,
) -> None:
    """Under FAIL_FAST an async body sleeping on a Dask worker is cancelled there at its
    `await`: its CancelledError handler runs and the code after the sleep never does."""

    @step(step_operator="dask", enable_cache=False)
    async def sleeps_on_dask(where: str) -> int:
        note(where, "started", str(os.getpid()))
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            note(where, "cancelled", "cancelled")
            raise
        note(where, "finished", "finished")
        return 1

    @step(enable_cache=False)
    def fails_once_sleeping(where: str) -> int:
        wait_for_file(Path(where, "started"))
        raise RuntimeError("local failure")

    @pipeline(execution_mode=ExecutionMode.FAIL_FAST)
    def async_on_dask(where: str) -> None:
        sleeps_on_dask(where)
        fails_once_sleeping(where)

    started = time.monotonic()
    with pytest.raises(RunFailedError) as info:
        async_on_dask.with_options(stack=dask_stack)(where=str(tmp_path))
    run = info.value.run
    assert run is not None and run.steps["sleeps_on_dask"].status is StepStatus.STOPPED
    assert wait_for_file(tmp_path / "cancelled", timeout=10) == "cancelled"
    time.sleep(max(0.0, started + 6 - time.monotonic()))
    assert not (tmp_path / "finished").exists()
    deadline = time.monotonic() + 10
    while dask_call_tasks(dask_cluster) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dask_call_tasks(dask_cluster) == {}
