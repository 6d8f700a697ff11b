"""Property test: random DAGs with random failing steps, in every execution mode.

Each example builds a pipeline of up to 12 invocations of one step, with edges only from a lower
to a higher index, each edge wired as data, as `after=<handle>` or as `after="<invocation ID>"`.
Step bodies record the (start, end) ticks of a shared counter, so the checks compare real
orderings on the event loop, not wall-clock times.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flowcore import (
    ExecutionMode,
    PipelineRun,
    RunFailedError,
    RunStatus,
    Stack,
    StepStatus,
    pipeline,
    step,
)

TERMINAL = {StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.STOPPED}
EDGE_KINDS = ("data", "after_handle", "after_id")


class NodeFailed(Exception):
    """Raised by a node chosen to fail."""


@dataclass
class Trace:
    """What the step bodies of one run did, in the order they did it."""

    tick: int = 0
    start: dict[int, int] = field(default_factory=dict)
    end: dict[int, int] = field(default_factory=dict)
    outcome: dict[int, str] = field(default_factory=dict)  # "ok", "raised", "cancelled"
    deps_seen: dict[int, list[int]] = field(default_factory=dict)

    def next(self) -> int:
        self.tick += 1
        return self.tick


_TRACE: Trace | None = None

# A run of these tiny DAGs takes milliseconds; one that has not ended after this hangs.
RUN_TIMEOUT = 3.0


@step(enable_cache=False)
async def node(idx: int, fail: bool, pause: int, deps: list[int]) -> int:
    """A DAG node: records its start, yields `pause` times, records its end, maybe fails."""
    tr = _TRACE
    assert tr is not None
    tr.start[idx] = tr.next()
    tr.deps_seen[idx] = list(deps)
    try:
        for _ in range(pause):
            await asyncio.sleep(0)
    except asyncio.CancelledError:
        tr.end[idx] = tr.next()
        tr.outcome[idx] = "cancelled"
        raise
    tr.end[idx] = tr.next()
    if fail:
        tr.outcome[idx] = "raised"
        raise NodeFailed(f"node {idx}")
    tr.outcome[idx] = "ok"
    return idx


@dataclass(frozen=True)
class DagSpec:
    """A random DAG: parents per node (with the edge's wiring), failing nodes and pauses."""

    n: int
    parents: tuple[tuple[tuple[int, str], ...], ...]
    failing: frozenset[int]
    pauses: tuple[int, ...]

    def parent_ids(self, j: int) -> list[int]:
        return [i for i, _ in self.parents[j]]

    def ancestors(self, j: int) -> set[int]:
        out: set[int] = set()
        stack = self.parent_ids(j)
        while stack:
            i = stack.pop()
            if i not in out:
                out.add(i)
                stack.extend(self.parent_ids(i))
        return out


@st.composite
def dags(draw: st.DrawFn) -> DagSpec:
    """Random DAGs of 1 to 12 nodes."""
    n = draw(st.integers(min_value=1, max_value=12))
    parents = []
    for j in range(n):
        chosen = draw(st.lists(st.integers(0, j - 1), unique=True, max_size=min(j, 4))) if j else []
        parents.append(tuple((i, draw(st.sampled_from(EDGE_KINDS))) for i in sorted(chosen)))
    failing = draw(st.frozensets(st.integers(0, n - 1), max_size=min(n, 3)))
    pauses = tuple(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    return DagSpec(n=n, parents=tuple(parents), failing=failing, pauses=pauses)


def build(spec: DagSpec, mode: ExecutionMode) -> Any:
    """The pipeline of `spec`: node j is invocation "n<j>"."""

    @pipeline(enable_cache=False, execution_mode=mode)
    def random_dag() -> None:
        handles: dict[int, Any] = {}
        for j in range(spec.n):
            data = [handles[i] for i, kind in spec.parents[j] if kind == "data"]
            after: list[Any] = [handles[i] if kind == "after_handle" else f"n{i}"
                                for i, kind in spec.parents[j] if kind != "data"]
            handles[j] = node(idx=j, fail=j in spec.failing, pause=spec.pauses[j], deps=data,
                              after=after or None, step_name=f"n{j}")

    return random_dag


def execute(spec: DagSpec, mode: ExecutionMode) -> tuple[PipelineRun, Trace, BaseException | None]:
    """Run the DAG on a fresh in-memory stack and loop; a hang fails the example."""
    global _TRACE
    trace = _TRACE = Trace()
    p = build(spec, mode).with_options(stack=Stack.in_memory())

    async def main() -> tuple[PipelineRun, BaseException | None]:
        try:
            run = await asyncio.wait_for(p.run(), RUN_TIMEOUT)
        except RunFailedError as exc:
            return exc.run, exc
        return run, None

    try:
        run, err = asyncio.run(main())
    finally:
        _TRACE = None
    return run, trace, err


def check_common(spec: DagSpec, run: PipelineRun, tr: Trace, err: BaseException | None) -> None:
    """Checks that hold in every mode."""
    status = {j: run.steps[f"n{j}"].status for j in range(spec.n)}
    assert set(run.steps) == {f"n{j}" for j in range(spec.n)}
    for j, s in status.items():
        assert s in TERMINAL, f"n{j} ended {s}"
    for j, begun in tr.start.items():
        for i in spec.parent_ids(j):
            assert i in tr.end and tr.end[i] < begun, f"n{j} started before its parent n{i} ended"
            assert status[i] is StepStatus.COMPLETED, f"n{j} ran although n{i} is {status[i]}"
        data = [i for i, kind in spec.parents[j] if kind == "data"]
        assert tr.deps_seen[j] == data
    for j in range(spec.n):
        if j not in tr.start:
            assert status[j] in (StepStatus.SKIPPED, StepStatus.STOPPED), (
                f"n{j} never ran but is {status[j]}")
        elif tr.outcome[j] == "raised":
            assert status[j] is StepStatus.FAILED
        elif tr.outcome[j] == "cancelled":
            assert status[j] is StepStatus.STOPPED
    for j in range(spec.n):
        if status[j] is StepStatus.FAILED:
            assert j in spec.failing and tr.outcome.get(j) == "raised"
    any_failed = any(s is StepStatus.FAILED for s in status.values())
    if any_failed:
        assert run.status is RunStatus.FAILED
        assert isinstance(err, RunFailedError)
        assert isinstance(err.__cause__, NodeFailed)
        first = min((j for j in range(spec.n) if tr.outcome.get(j) == "raised"),
                    key=lambda j: tr.end[j])
        assert str(err.__cause__) == f"node {first}"
    else:
        assert err is None
        assert run.status is RunStatus.COMPLETED


def first_failure_tick(tr: Trace) -> int | None:
    """The tick at which the first body raised, or None."""
    ticks = [tr.end[j] for j, o in tr.outcome.items() if o == "raised"]
    return min(ticks) if ticks else None


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(spec=dags())
def test_continue_on_failure_skips_exactly_descendants_of_failed(spec: DagSpec) -> None:
    """CONTINUE_ON_FAILURE: descendants of failed steps are SKIPPED, everything else runs."""
    run, tr, err = execute(spec, ExecutionMode.CONTINUE_ON_FAILURE)
    check_common(spec, run, tr, err)
    for j in range(spec.n):
        status = run.steps[f"n{j}"].status
        if spec.ancestors(j) & spec.failing:
            assert status is StepStatus.SKIPPED, f"n{j}: {status}"
            assert j not in tr.start
        elif j in spec.failing:
            assert status is StepStatus.FAILED, f"n{j}: {status}"
        else:
            assert status is StepStatus.COMPLETED, f"n{j}: {status}"
            assert tr.outcome[j] == "ok"
    assert "cancelled" not in tr.outcome.values()


# Two independent roots launched together; the first fails before the second has begun.
TWO_ROOTS_FIRST_FAILS = DagSpec(n=2, parents=((), ()), failing=frozenset({0}), pauses=(0, 0))


@SETTINGS
@example(spec=TWO_ROOTS_FIRST_FAILS)
@given(spec=dags())
def test_fail_fast_starts_nothing_after_first_failure(spec: DagSpec) -> None:
    """FAIL_FAST: no body starts after the first failure and bodies then running are STOPPED."""
    run, tr, err = execute(spec, ExecutionMode.FAIL_FAST)
    check_common(spec, run, tr, err)
    t_fail = first_failure_tick(tr)
    if t_fail is None:
        assert all(run.steps[f"n{j}"].status is StepStatus.COMPLETED for j in range(spec.n))
        return
    late = sorted(j for j, t in tr.start.items() if t > t_fail)
    assert late == [], f"started after the first failure: {late}"
    raised = [j for j, o in tr.outcome.items() if o == "raised"]
    assert len(raised) == 1, f"bodies kept running and failed after the first failure: {raised}"
    for j, begun in tr.start.items():
        if begun < t_fail and tr.end[j] > t_fail:
            # Running when the first failure happened: cancelled at once.
            assert tr.outcome[j] == "cancelled", f"n{j} ran on after the failure"
            assert run.steps[f"n{j}"].status is StepStatus.STOPPED


def check_stop_on_failure(spec: DagSpec, run: PipelineRun, tr: Trace,
                          err: BaseException | None) -> int | None:
    """Checks for STOP_ON_FAILURE that hold whatever "started" means; returns the failure tick."""
    check_common(spec, run, tr, err)
    assert "cancelled" not in tr.outcome.values()
    for j in tr.start:
        expected = StepStatus.FAILED if j in spec.failing else StepStatus.COMPLETED
        assert run.steps[f"n{j}"].status is expected
    for j in range(spec.n):
        if j not in tr.start:
            assert run.steps[f"n{j}"].status is StepStatus.SKIPPED
    t_fail = first_failure_tick(tr)
    if t_fail is None:
        assert all(run.steps[f"n{j}"].status is StepStatus.COMPLETED for j in range(spec.n))
        return None
    # A step whose last dependency ended after the first failure is never started.
    for j, begun in tr.start.items():
        if begun > t_fail:
            assert all(tr.end[i] < t_fail for i in spec.parent_ids(j)), (
                f"n{j} became ready after the first failure and still started")
    return t_fail


@SETTINGS
@given(spec=dags())
def test_stop_on_failure_drains_started_steps(spec: DagSpec) -> None:
    """STOP_ON_FAILURE: nothing that becomes ready after the first failure starts; every started
    body runs to its end (none is cancelled) and the rest is SKIPPED."""
    run, tr, err = execute(spec, ExecutionMode.STOP_ON_FAILURE)
    check_stop_on_failure(spec, run, tr, err)


@SETTINGS
@example(spec=TWO_ROOTS_FIRST_FAILS)
@given(spec=dags())
def test_stop_on_failure_starts_nothing_after_first_failure(spec: DagSpec) -> None:
    """STOP_ON_FAILURE: no step body at all starts after the first failure."""
    run, tr, err = execute(spec, ExecutionMode.STOP_ON_FAILURE)
    t_fail = check_stop_on_failure(spec, run, tr, err)
    if t_fail is not None:
        late = sorted(j for j, t in tr.start.items() if t > t_fail)
        assert late == [], f"started after the first failure: {late}"


@pytest.mark.parametrize("mode", list(ExecutionMode), ids=lambda m: m.value)
def test_example_diamond_with_failing_root_branch(mode: ExecutionMode) -> None:
    """A fixed example: in a diamond 0 -> {1, 2} -> 3 with 1 failing, 3 is SKIPPED in every mode."""
    spec = DagSpec(
        n=4,
        parents=((), ((0, "data"),), ((0, "after_id"),), ((1, "after_handle"), (2, "data"))),
        failing=frozenset({1}),
        pauses=(0, 1, 2, 0),
    )
    run, tr, err = execute(spec, mode)
    check_common(spec, run, tr, err)
    assert run.steps["n1"].status is StepStatus.FAILED
    assert run.steps["n3"].status is StepStatus.SKIPPED
    assert 3 not in tr.start
