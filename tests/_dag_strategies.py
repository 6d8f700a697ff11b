"""Random DAGs of slow, failing, retried and timed-out sync and async steps for
tests/test_property_cancel.py: building and running them, the trace their bodies and hooks
leave, and the checks of that trace against the stored rows.

Every body and hook records when it entered and left (time.monotonic, comparable across the
loop thread and worker threads), and every body that ends its step's last attempt in failure
records the moment of that failure, so the tests can compare what the engine did with what
API.md section 13 allows.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
from hypothesis import assume
from hypothesis import strategies as st

from flowcore import (
    AsyncClient,
    ExecutionMode,
    Pipeline,
    PipelineRun,
    RunNotFoundError,
    RunStatus,
    Stack,
    StepRetryConfig,
    StepStatus,
    get_step_context,
    pipeline,
    step,
)

# How late the engine may learn of a failure: at once for an async body (it raises on the loop),
# a thread hop or a late timer for a sync body or a timeout.
TOL_ASYNC = 0.02
TOL_SYNC = 0.06
# A sync body the engine handed to a worker thread just before a failure may enter a little after.
SYNC_START_SLACK = 0.04

SLEEPS = (0.0, 0.05, 0.1, 0.2, 0.3)
BEHAVIOURS = ("ok", "ok", "fail", "flaky", "base")
CANCELS = ("none", "task", "move_on_after", "asyncio_timeout", "handle")
DELAYS = (0.0, 0.02, 0.06, 0.12, 0.2, 0.3)


class BodyAbort(BaseException):
    """Raised by a body chosen to end with a BaseException that is not an Exception."""


@dataclass(frozen=True)
class NodeSpec:
    """One invocation `s<j>` of a random DAG."""

    is_sync: bool
    parents: tuple[tuple[int, bool], ...]  # (parent index, passed as data rather than after=)
    behaviour: str  # ok | fail (ValueError) | flaky (first attempt fails) | base (BodyAbort)
    sleep: float
    hook_sleep: float | None  # None: no hooks; else on_failure and on_end sleep this long
    retries: int
    timeout: float | None  # always shorter than sleep

    @property
    def attempts(self) -> int:
        return self.retries + 1


@dataclass(frozen=True)
class DagSpec:
    """A random DAG; node j is invocation `s<j>`."""

    nodes: tuple[NodeSpec, ...]

    @property
    def ids(self) -> list[str]:
        return [f"s{j}" for j in range(len(self.nodes))]


@dataclass
class BodyRec:
    """One body run: step index, attempt, thread kind, enter/exit times and how it ended."""

    step: int
    attempt: int
    is_sync: bool
    enter: float
    exit: float | None = None
    outcome: str = "running"  # ok | raised | base | cancelled | late (sync, after its timeout)


@dataclass
class HookRec:
    """One hook call."""

    step: int
    kind: str
    is_sync: bool
    enter: float
    exit: float | None = None


@dataclass
class Trace:
    """What the bodies and hooks of one run did."""

    t0: float = field(default_factory=time.monotonic)
    bodies: list[BodyRec] = field(default_factory=list)
    hooks: list[HookRec] = field(default_factory=list)
    # (moment the step's last attempt failed, how late the engine may learn of it, step)
    failures: list[tuple[float, float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter_body(self, j: int, is_sync: bool) -> BodyRec:
        rec = BodyRec(j, get_step_context().step_run.attempt, is_sync, time.monotonic())
        with self.lock:
            self.bodies.append(rec)
        return rec

    def enter_hook(self, j: int, kind: str, is_sync: bool) -> HookRec:
        rec = HookRec(j, kind, is_sync, time.monotonic())
        with self.lock:
            self.hooks.append(rec)
        return rec

    def fail(self, at: float, tol: float, j: int) -> None:
        with self.lock:
            self.failures.append((at, tol, j))

    def exits(self) -> list[float | None]:
        """When each body and hook returned (None: still running)."""
        with self.lock:
            return [r.exit for r in self.bodies] + [r.exit for r in self.hooks]

    def unfinished(self) -> int:
        return sum(e is None for e in self.exits())

    def rel(self, t: float | None) -> str:
        return "never" if t is None else f"{t - self.t0:.3f}s"


def _conclude(trace: Trace, j: int, node: NodeSpec, rec: BodyRec) -> int:
    """End a body that slept its full time: return, or raise as its behaviour says."""
    now = time.monotonic()
    late = node.timeout is not None and now - rec.enter >= node.timeout
    fails = node.behaviour in ("fail", "base") or (node.behaviour == "flaky" and rec.attempt == 1)
    last = rec.attempt >= node.attempts
    if late:
        # The engine gave up on this attempt at its timeout (a StepTimeoutError, retried like
        # any Exception); what the body does now is ignored.
        assert node.timeout is not None
        if last:
            trace.fail(rec.enter + node.timeout, TOL_SYNC, j)
        rec.outcome = "late"
    elif fails:
        # A BaseException is not in retry_on=(Exception,): it ends the step at any attempt.
        if last or node.behaviour == "base":
            trace.fail(now, TOL_SYNC if node.is_sync else TOL_ASYNC, j)
        rec.outcome = "base" if node.behaviour == "base" else "raised"
    else:
        rec.outcome = "ok"
    rec.exit = now
    if fails and node.behaviour == "base":
        raise BodyAbort(f"s{j} aborts")
    if fails:
        raise ValueError(f"s{j} failed (attempt {rec.attempt})")
    return j


def _body(trace: Trace, j: int, node: NodeSpec) -> Callable[..., Any]:
    if node.is_sync:
        def sync_body(deps: list[int]) -> int:
            rec = trace.enter_body(j, True)
            time.sleep(node.sleep)
            return _conclude(trace, j, node, rec)
        return sync_body

    async def async_body(deps: list[int]) -> int:
        rec = trace.enter_body(j, False)
        try:
            await asyncio.sleep(node.sleep)
        except asyncio.CancelledError:
            now = time.monotonic()
            rec.exit, rec.outcome = now, "cancelled"
            timed_out = node.timeout is not None and now - rec.enter >= node.timeout - TOL_ASYNC
            if timed_out and rec.attempt >= node.attempts:
                trace.fail(now, TOL_ASYNC, j)
            raise
        return _conclude(trace, j, node, rec)
    return async_body


def _hook(trace: Trace, j: int, node: NodeSpec, kind: str) -> Callable[..., Any]:
    pause = node.hook_sleep or 0.0
    if node.is_sync:
        def sync_hook(step_name: str, exception: BaseException | None) -> None:
            rec = trace.enter_hook(j, kind, True)
            try:
                time.sleep(pause)
            finally:
                rec.exit = time.monotonic()
        return sync_hook

    async def async_hook(step_name: str, exception: BaseException | None) -> None:
        rec = trace.enter_hook(j, kind, False)
        try:
            await asyncio.sleep(pause)
        finally:
            rec.exit = time.monotonic()
    return async_hook


def build(spec: DagSpec, mode: ExecutionMode, trace: Trace) -> Pipeline:
    """The pipeline of `spec`, recording into `trace`."""
    steps = []
    for j, node in enumerate(spec.nodes):
        options: dict[str, Any] = {"enable_cache": False}
        if node.hook_sleep is not None:
            options["on_failure"] = _hook(trace, j, node, "on_failure")
            options["on_end"] = _hook(trace, j, node, "on_end")
        if node.retries:
            options["retry"] = StepRetryConfig(max_retries=node.retries, delay=0)
        if node.timeout is not None:
            options["timeout"] = node.timeout
        steps.append(step(**options)(_body(trace, j, node)))

    @pipeline(enable_cache=False, execution_mode=mode)
    def random_dag() -> None:
        handles: dict[int, Any] = {}
        for j, node in enumerate(spec.nodes):
            data = [handles[i] for i, as_data in node.parents if as_data]
            after = [handles[i] for i, as_data in node.parents if not as_data]
            handles[j] = steps[j](deps=data, after=after or None, step_name=f"s{j}")

    return random_dag


def cost(spec: DagSpec) -> float:
    """An upper bound of the seconds the bodies and hooks of a run sleep in all."""
    return sum(n.attempts * n.sleep + 2 * (n.hook_sleep or 0.0) for n in spec.nodes)


@st.composite
def dags(draw: st.DrawFn) -> DagSpec:
    """Random DAGs of 2 to 8 steps that sleep at most ~1.6 s in all."""
    n = draw(st.integers(min_value=2, max_value=8))
    nodes = []
    for j in range(n):
        chosen = draw(st.lists(st.integers(0, j - 1), unique=True, max_size=min(j, 3))) if j else []
        parents = tuple((i, draw(st.booleans())) for i in sorted(chosen))
        behaviour = draw(st.sampled_from(BEHAVIOURS))
        sleep = draw(st.sampled_from(SLEEPS))
        timeout = None
        if sleep >= 0.1 and draw(st.integers(0, 3)) == 0:
            timeout = round(sleep / 2, 3)
        hook_sleep = draw(st.sampled_from((None, None, 0.0, 0.1, 0.2)))
        if behaviour == "base" and hook_sleep is None:
            hook_sleep = 0.0  # the hooks are what a BaseException must not skip
        nodes.append(NodeSpec(
            is_sync=draw(st.booleans()), parents=parents, behaviour=behaviour, sleep=sleep,
            hook_sleep=hook_sleep, retries=draw(st.sampled_from((0, 0, 1, 2))), timeout=timeout,
        ))
    spec = DagSpec(tuple(nodes))
    assume(cost(spec) <= 1.6)
    return spec


# -- driving a run and reading its rows back --------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """A copy of the stored run row and its step rows (the in-memory store shares live objects)."""

    status: RunStatus
    steps: dict[str, tuple[StepStatus, int, datetime | None, str | None]]


async def read_rows(stack: Stack, run_name: str) -> Rows | None:
    """The stored rows of a run, or None if it was never stored."""
    try:
        run = await AsyncClient(stack).get_pipeline_run(run_name)
    except RunNotFoundError:
        return None
    return Rows(run.status, {name: (sr.status, sr.attempts, sr.end_time,
                                    sr.error.type if sr.error else None)
                             for name, sr in run.steps.items()})


@dataclass
class Outcome:
    """How the call ended: its result or exception, and whether the cancellation reached it."""

    run_name: str
    result: PipelineRun | None = None
    raised: BaseException | None = None
    effective: bool = False  # the cancellation was delivered while the call was running
    cancel_time: float | None = None


async def call(p: Pipeline, cancel: str, delay: float) -> Outcome:
    """Run `p` and cancel it `delay` seconds in, the `cancel` way."""
    out = Outcome(run_name=f"prop_{uuid.uuid4().hex}")
    p = p.with_options(run_name=out.run_name)
    try:
        if cancel == "none":
            out.result = await p.run()
        elif cancel == "task":
            task = asyncio.get_running_loop().create_task(p.run())
            await asyncio.sleep(delay)
            out.cancel_time = time.monotonic()
            out.effective = task.cancel()
            out.result = await task
        elif cancel == "move_on_after":
            out.cancel_time = time.monotonic() + delay
            scope = anyio.move_on_after(delay)
            try:
                with scope:
                    out.result = await p.run()
            finally:
                out.effective = scope.cancel_called
            if out.effective and not scope.cancelled_caught:
                out.raised = AssertionError("the cancel scope's cancellation was swallowed")
        elif cancel == "asyncio_timeout":
            out.cancel_time = time.monotonic() + delay
            async with asyncio.timeout(delay) as cm:
                try:
                    out.result = await p.run()
                finally:
                    out.effective = cm.expired()
        else:
            handle = p.submit()
            await asyncio.sleep(delay)
            out.cancel_time = time.monotonic()
            out.effective = not handle.done()
            out.result = await handle.cancel()
    except (Exception, asyncio.CancelledError, BodyAbort) as exc:
        out.raised = exc
    return out


async def settle(tr: Trace) -> None:
    """Wait for abandoned sync bodies and hooks to return (they cannot be interrupted)."""
    for _ in range(150):
        if tr.unfinished() == 0:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)


def check_trace(spec: DagSpec, mode: ExecutionMode, rows: Rows, tr: Trace, cancelled: bool) -> list[str]:
    """(b) nothing starts after a failure, (c) no overlapping bodies, (d) BaseException bodies."""
    bad: list[str] = []
    for name, (status, *_) in rows.steps.items():
        ran = [r for r in tr.bodies if f"s{r.step}" == name]
        if status is StepStatus.SKIPPED and ran:
            bad.append(f"(b) {name} is SKIPPED but its body ran at {tr.rel(ran[0].enter)}")
    if mode is not ExecutionMode.CONTINUE_ON_FAILURE and tr.failures:
        at, tol, j = min(tr.failures, key=lambda f: f[0] + f[1])
        for r in tr.bodies:
            if r.enter > at + tol + (SYNC_START_SLACK if r.is_sync else 0.0):
                bad.append(f"(b) s{r.step} attempt {r.attempt} started at {tr.rel(r.enter)}, after "
                           f"s{j} failed at {tr.rel(at)}")
    for j in range(len(spec.nodes)):
        runs = sorted((r for r in tr.bodies if r.step == j), key=lambda r: r.enter)
        for a, b in itertools.pairwise(runs):
            if a.exit is None or b.enter < a.exit:
                bad.append(f"(c) s{j}: attempt {b.attempt} entered at {tr.rel(b.enter)} while "
                           f"attempt {a.attempt} ran until {tr.rel(a.exit)}")
    for j in range(len(spec.nodes)):
        mine = [r for r in tr.bodies if r.step == j]
        if not mine or mine[-1].outcome != "base" or cancelled:
            continue
        status, _, _, err = rows.steps[f"s{j}"]
        if status is StepStatus.STOPPED and mode is ExecutionMode.FAIL_FAST:
            continue  # cancelled by an earlier failure elsewhere before its own was seen
        hooks = {h.kind for h in tr.hooks if h.step == j}
        if status is not StepStatus.FAILED or err != "BodyAbort" or hooks != {"on_failure", "on_end"}:
            bad.append(f"(d) s{j} raised BodyAbort: stored {status} error {err}, hooks run {hooks}")
    return bad
