"""The scheduler: drives a graph's ready set inside one task group of step tasks.

A step task is created the moment its last dependency ends (the finishing task launches its
ready children itself: no polling, no batches); when a step makes exactly one other ready (a
chain), the finishing task runs that one itself, up to `_IN_A_ROW` steps in a row. The task
group does the waiting (its exit waits for every task, also those launched later) and the
aborting: under FAIL_FAST a failure aborts the steps group at once, as the group does itself
when a child raises (trio's `nursery.cancel_scope.cancel()`), and the failed step's hooks run
after the group has ended.
Once a step has failed in a stopping mode no body starts: the gate says no before the
failure's hooks run, to tasks launched earlier, to steps waiting for a slot and to retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from flowcore._clock import utcnow
from flowcore._engine._fanout import run_map
from flowcore._engine._invocation import STOPPED, Invoker, Outcome
from flowcore._engine._isolation import SHARED, isolated
from flowcore._engine._lifecycle import Lifecycle
from flowcore._engine._plan import RunPlan
from flowcore._graph import Node, OutputRef
from flowcore._models import ArtifactVersion, StepRun
from flowcore.config import ExecutionMode
from flowcore.stack._remote_data import StoredValue
from flowcore.stores._base import MetadataStore

__all__ = ["Scheduler"]


# An output not in memory (a cache hit, or an output a remote worker stored itself): loaded
# from its artifact when a consumer on this machine first needs it.
_Lazy = StoredValue


def _abort(tg: asyncio.TaskGroup | None, host: asyncio.Task[Any] | None) -> None:
    """Cancel every task of the steps group now, as the group itself does when a child
    raises (asyncio's `TaskGroup._abort`): at once, so no sibling body runs another step of
    the loop. Every supported Python (3.11-3.13) has that method; without it, the group's host
    task (the run's own) is cancelled, which aborts the group one iteration later and records
    the run STOPPED rather than FAILED."""
    abort = getattr(tg, "_abort", None)
    if abort is not None:
        abort()
    elif host is not None:
        host.cancel()


class _RunOver:
    """The gate of an invoker whose run has ended: nothing starts any more."""

    slots: asyncio.Semaphore | None = None

    def may_start(self) -> bool:
        return False

    def failed(self, error: BaseException) -> bool:
        return True

    def defer(self, hooks: Callable[[], Awaitable[None]]) -> None:
        pass


_RUN_OVER = _RunOver()

# How many steps of a chain one task runs in a row: when a finished step makes exactly one
# other step ready, that step runs next in the same task (a task of its own costs ~5 us of
# loop time, most of a small step's price); after this many, the next one gets a new task,
# so other work on the loop still gets a turn at least every few milliseconds.
_IN_A_ROW = 16


class Scheduler:
    """Drives one run of a graph; it is also the `Gate` its invocations ask."""

    def __init__(self, plan: RunPlan, lifecycle: Lifecycle, store: MetadataStore) -> None:
        graph = plan.graph
        self.plan = plan
        self.graph = graph
        self.nodes = graph.nodes
        self.node_plans = plan.plans
        self.lifecycle = lifecycle
        self.step_runs: list[StepRun] = [plan.run.steps[n.id] for n in graph.nodes]
        self.ready = graph.ready_set()
        self.values: list[dict[str, Any] | None] = [None] * len(graph.nodes)
        self.artifacts: list[dict[str, ArtifactVersion] | None] = [None] * len(graph.nodes)
        self.consumers_left = list(graph.data_consumers)
        self.index = {n.id: n.index for n in graph.nodes}
        self.mode = plan.mode
        self.stopping = False
        self.first_error: BaseException | None = None
        self.deferred: list[Callable[[], Awaitable[None]]] = []
        self._slots = (
            asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency is not None else None
        )
        self.invoker = Invoker(plan, lifecycle, store, self)
        self.tg: asyncio.TaskGroup | None = None
        self.host: asyncio.Task[Any] | None = None
        # Set once the steps group was aborted (FAIL_FAST or a stop request), and when someone
        # asked the run to stop.
        self.aborted = False
        self.stop_requested = False
        # Set when the run passed its deadline: it then ends FAILED with this as the cause.
        self.deadline_error: BaseException | None = None
        self.reused: set[int] = set()  # node indices whose original outputs a resume reuses

    def close(self) -> None:
        """The run is over: the invoker forgets this scheduler, so the run's objects (plan,
        graph, records) are freed by reference counting when the last user lets go, instead
        of being left for the garbage collector (a burst of runs would feed it thousands)."""
        self.invoker.gate = _RUN_OVER

    # -- Gate ------------------------------------------------------------------------------

    def may_start(self) -> bool:
        return not self.stopping

    def failed(self, error: BaseException) -> bool:
        if self.first_error is None:
            self.first_error = error
        if self.mode is ExecutionMode.CONTINUE_ON_FAILURE:
            return True
        self.stop_new_work()
        if self.mode is not ExecutionMode.FAIL_FAST:
            return True
        if not self.aborted:
            self.aborted = True
            _abort(self.tg, self.host)
        return False

    def defer(self, hooks: Callable[[], Awaitable[None]]) -> None:
        self.deferred.append(hooks)

    @property
    def slots(self) -> asyncio.Semaphore | None:
        return self._slots

    def request_stop(self, drain: bool) -> None:
        """Stop the run from outside (closing the stack, a cancel request): with `drain` like
        STOP_ON_FAILURE (running steps finish, nothing new starts), else like FAIL_FAST."""
        self.stop_requested = True
        self.stop_new_work()
        if not drain and not self.aborted:
            self.aborted = True
            _abort(self.tg, self.host)

    def deadline_passed(self) -> None:
        """The run's deadline: cancelled like FAIL_FAST, the run ends FAILED."""
        from flowcore.exceptions import RunTimeoutError

        if self.deadline_error is None:
            run = self.lifecycle.run
            self.deadline_error = RunTimeoutError(
                f"run '{run.name}' of pipeline '{run.pipeline_name}' passed its deadline of "
                f"{self.plan.timeout} s (timeout=) and was stopped")
            self.request_stop(drain=False)

    def stop_new_work(self) -> None:
        """No step body starts from now on; steps not yet handed out are skipped."""
        if not self.stopping:
            self.stopping = True
            self._skip(self.ready.skip_rest())

    # -- driving ---------------------------------------------------------------------------

    async def drive(self) -> None:
        """Run every step, as the steps task of the run (FAIL_FAST cancels this task)."""
        self.host = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                self._launch(self.ready.get_ready())
        finally:
            self.tg = None
            self.host = None

    async def run_deferred_hooks(self) -> None:
        """FAIL_FAST ran no failure hook while other steps ran: they run now, in order."""
        deferred, self.deferred = self.deferred, []
        for hooks in deferred:
            await hooks()

    def _launch(self, indices: list[int]) -> None:
        tg = self.tg
        assert tg is not None
        nodes = self.nodes
        for i in indices:
            tg.create_task(self._step_task(i), name=f"flowcore:{nodes[i].id}")

    def _skip(self, indices: list[int]) -> None:
        if indices:
            step_runs = self.step_runs
            self.lifecycle.steps_skipped([step_runs[j] for j in indices])

    async def _step_task(self, i: int) -> None:
        in_a_row = 1
        while True:
            sr = self.step_runs[i]
            if self.stopping:
                # Launched together with a step that failed before this task got its first turn.
                self.lifecycle.steps_skipped([sr])
                self._after(i, ok=False)
                return
            sr.start_time = utcnow()
            try:
                outcome = await self._execute(i)
            except asyncio.CancelledError:
                self.lifecycle.step_stopped(sr)
                raise
            except BaseException as exc:  # a bug in flowcore itself: record, never hang the run
                self.lifecycle.step_failed(sr, exc)
                self.failed(exc)
                outcome = Outcome(False, error=exc)
            following = self._after(i, ok=outcome.ok, go_on=in_a_row < _IN_A_ROW)
            if following is None:
                return
            i = following
            in_a_row += 1

    def _after(self, i: int, *, ok: bool, go_on: bool = False) -> int | None:
        """Account for step `i`'s end and hand out what became ready. With `go_on`, a single
        step made ready is returned, for the caller to run next in the same task (a chain),
        instead of launched in a task of its own."""
        # Release upstream values nobody downstream needs any more.
        left = self.consumers_left
        for p in self.nodes[i].data_parents:
            left[p] -= 1
            if left[p] == 0:
                self.values[p] = None
        if ok:
            newly = self.ready.done(i)
            if newly:
                if self.stopping:
                    self._skip(newly)
                elif go_on and len(newly) == 1:
                    return newly[0]
                else:
                    self._launch(newly)
        else:
            self._skip(self.ready.failed(i))
        return None

    async def _execute(self, i: int) -> Outcome:
        node = self.nodes[i]
        sr = self.step_runs[i]
        node_plan = self.node_plans[i]
        invoker = self.invoker
        if self.plan.resume:
            reused = await self._reuse(i, node, sr)
            if reused is not None:
                return reused
        if node.map_spec is not None:
            kwargs = await self._inputs(node)
            hashes = self._input_hashes(node) if node.config.enable_cache else {}
            outcome = await run_map(invoker, node, sr, node_plan, kwargs, hashes)
        else:
            if node.config.enable_cache:
                hit = await invoker.lookup(node, sr, node_plan, self._input_hashes(node))
                if hit is not None:
                    self.artifacts[i] = hit
                    self.values[i] = {name: _Lazy(a) for name, a in hit.items()}
                    return Outcome(True)
            if node.direct_refs or node.nested_refs:
                if node_plan.operator is not None and invoker.moves_data(node, node_plan):
                    # The body runs on a worker that loads its inputs itself: references only.
                    kwargs = self._references(node)
                else:
                    at_hand = self._inputs_at_hand(node)
                    kwargs = at_hand if at_hand is not None else await self._inputs(node)
            else:
                kwargs = dict(node.constants)
            slots = self._slots
            if slots is None:
                outcome = await invoker.invoke(node, sr, node_plan, kwargs)
            else:
                async with slots:
                    if self.stopping:
                        self.lifecycle.steps_skipped([sr])
                        return STOPPED
                    outcome = await invoker.invoke(node, sr, node_plan, kwargs)
        if outcome.ok:
            self.values[i] = outcome.values
            self.artifacts[i] = outcome.artifacts
        return outcome

    async def _reuse(self, i: int, node: Node, sr: StepRun) -> Outcome | None:
        """Resuming (API.md §14): an invocation that COMPLETED or was CACHED in the original
        run, with unchanged parameters and every upstream invocation reused too, is CACHED
        with the original's outputs, whatever its cache setting."""
        original = self.plan.resume.get(node.id)
        if original is None or not all(p in self.reused for p in node.parents):
            return None
        if original.config.parameters != sr.config.parameters:
            return None
        for artifact in original.outputs.values():
            if await self.invoker.artifact_store.verify(artifact) is not None:
                return None  # gone or damaged: the step runs again
        if not self.lifecycle.step_cached(sr, dict(original.outputs), original.pipeline_run_id):
            return None
        self.reused.add(i)
        self.artifacts[i] = sr.outputs
        self.values[i] = {name: _Lazy(a) for name, a in sr.outputs.items()}
        if self.invoker.flush is not None:  # see Invoker.__init__
            await self.invoker.flush()
        return Outcome(True)

    # -- inputs ----------------------------------------------------------------------------

    async def _resolve(self, ref: OutputRef) -> Any:
        """This consumer's own copy of an upstream output (see _isolation)."""
        idx = self.index[ref.node_id]
        values = self.values[idx]
        if values is None:
            arts = self.artifacts[idx]
            assert arts is not None, f"output of {ref.node_id} is gone"
            return await arts[ref.output].aload()  # a fresh value, nobody else's
        value = values[ref.output]
        if type(value) is _Lazy:
            value = await value.artifact.aload()
            values[ref.output] = value
        try:
            return await isolated(value)
        except Exception:  # no copy possible: a fresh load of the stored artifact instead
            arts = self.artifacts[idx]
            assert arts is not None
            return await arts[ref.output].aload()

    async def _resolve_nested(self, template: Any) -> Any:
        if isinstance(template, OutputRef):
            return await self._resolve(template)
        if isinstance(template, list):
            return [await self._resolve_nested(v) for v in template]
        if isinstance(template, tuple):
            return tuple([await self._resolve_nested(v) for v in template])
        if isinstance(template, dict):
            return {k: await self._resolve_nested(v) for k, v in template.items()}
        return template

    def _inputs_at_hand(self, node: Node) -> dict[str, Any] | None:
        """The inputs without an await (no coroutine made), when every one is an immutable
        upstream value in memory, as in most steps; else None (see `_inputs`)."""
        if node.nested_refs:
            return None
        kwargs = dict(node.constants)
        values = self.values
        index = self.index
        for key, ref in node.direct_refs:
            held = values[index[ref.node_id]]
            value = held.get(ref.output, _Lazy) if held is not None else _Lazy
            if type(value) not in SHARED:
                return None
            kwargs[key] = value
        return kwargs

    async def _inputs(self, node: Node) -> dict[str, Any]:
        kwargs = dict(node.constants)
        values = self.values
        index = self.index
        for key, ref in node.direct_refs:
            # The common case without an await: an immutable upstream value in memory.
            held = values[index[ref.node_id]]
            value = held.get(ref.output, _Lazy) if held is not None else _Lazy
            if type(value) not in SHARED:
                value = await self._resolve(ref)
            kwargs[key] = value
        for key, template in node.nested_refs:
            kwargs[key] = await self._resolve_nested(template)
        return kwargs

    def _references(self, node: Node) -> dict[str, Any]:
        """A node's inputs as references to their stored artifacts (see stack/_remote_data)."""
        artifacts = self.artifacts
        index = self.index

        def ref_of(template: Any) -> Any:
            if isinstance(template, OutputRef):
                arts = artifacts[index[template.node_id]]
                assert arts is not None, f"output of {template.node_id} is gone"
                return StoredValue(arts[template.output])
            if isinstance(template, list):
                return [ref_of(v) for v in template]
            if isinstance(template, tuple):
                return tuple([ref_of(v) for v in template])
            if isinstance(template, dict):
                return {k: ref_of(v) for k, v in template.items()}
            return template

        kwargs = dict(node.constants)
        for key, ref in node.direct_refs:
            kwargs[key] = ref_of(ref)
        for key, template in node.nested_refs:
            kwargs[key] = ref_of(template)
        return kwargs

    def _input_hashes(self, node: Node) -> dict[str, Any]:
        artifacts = self.artifacts
        index = self.index
        if not node.nested_refs:
            # The common case, without the nested walk (the same identity as `h` gives).
            out: dict[str, Any] = {}
            for key, ref in node.direct_refs:
                arts = artifacts[index[ref.node_id]]
                assert arts is not None
                artifact = arts[ref.output]
                # Content and type: a Fahrenheit(10) is not a Celsius(10).
                out[key] = {"artifact": artifact.content_hash, "type": artifact.data_type}
            return out

        def h(value: Any) -> Any:
            if isinstance(value, OutputRef):
                arts = artifacts[index[value.node_id]]
                assert arts is not None
                artifact = arts[value.output]
                # Content and type: a Fahrenheit(10) is not a Celsius(10).
                return {"artifact": artifact.content_hash, "type": artifact.data_type}
            if isinstance(value, list | tuple):
                return [h(v) for v in value]
            if isinstance(value, dict):
                return {k: h(v) for k, v in value.items()}
            return value

        nested: dict[str, Any] = {}
        for key, ref in node.direct_refs:
            nested[key] = h(ref)
        for key, template in node.nested_refs:
            nested[key] = h(template)
        return nested
