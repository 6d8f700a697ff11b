"""Records of runs, step runs and artifacts: plain data that every layer above reads and writes."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "ArtifactVersion",
    "ErrorInfo",
    "HookError",
    "PipelineRun",
    "RunStatus",
    "StepRun",
    "StepRunConfig",
    "StepStatus",
    "encodable",
]


class StepStatus(enum.StrEnum):
    """Where one step invocation is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    CACHED = "cached"
    FAILED = "failed"
    SKIPPED = "skipped"
    STOPPED = "stopped"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED_STEP

    def __str__(self) -> str:
        return self.value


_FINISHED_STEP = frozenset(
    {StepStatus.COMPLETED, StepStatus.CACHED, StepStatus.FAILED, StepStatus.SKIPPED,
     StepStatus.STOPPED}
)


class RunStatus(enum.StrEnum):
    """Where a pipeline run is in its life; CRASHED means its process died mid-run."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    CRASHED = "crashed"

    @property
    def is_finished(self) -> bool:
        return self is not RunStatus.RUNNING

    def __str__(self) -> str:
        return self.value


def encodable(text: str) -> str:
    """`text`, with what UTF-8 cannot encode (lone surrogates, e.g. a file name decoded with
    `os.fsdecode`) written as backslash escapes such as `\\udcff`.

    Stored text must encode: SQLite, log files and terminals all reject lone surrogates, and a
    step must not break its run by printing or raising one.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The error a step ended with: its type name, message and formatted traceback.

    Text UTF-8 cannot encode is kept escaped (see `encodable`), so every store can hold it.
    """

    type: str
    message: str
    traceback: str

    def __post_init__(self) -> None:
        for name in ("type", "message", "traceback"):
            value = getattr(self, name)
            escaped = encodable(value)
            if escaped is not value:
                object.__setattr__(self, name, escaped)

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass(frozen=True, slots=True)
class HookError:
    """An exception raised by a hook, recorded on the step run (it never changes its status)."""

    hook: str
    kind: str
    error: ErrorInfo


@dataclass(slots=True)
class StepRunConfig:
    """The configuration one step invocation ran with."""

    parameters: dict[str, Any] = field(default_factory=dict)
    enable_cache: bool = True
    step_operator: str | None = None
    experiment_tracker: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


# Loading is synchronous (materializers are); `aload` runs it in a worker thread.
ArtifactLoader = Callable[["ArtifactVersion"], Any]


class ArtifactVersion:
    """One stored output of one step run.

    `load()` / `await aload()` read the value back through the artifact's materializer.
    """

    __slots__ = (
        "_content_hash",
        "_hasher",
        "_loader",
        "_value",
        "data_type",
        "id",
        "materializer",
        "name",
        "producer_step_run_id",
        "python_version",
        "size",
        "uri",
    )

    def __init__(
        self,
        *,
        id: str,
        name: str,
        uri: str,
        materializer: str,
        data_type: str,
        content_hash: str | None = None,
        size: int | None = None,
        producer_step_run_id: str | None = None,
        python_version: str | None = None,
        loader: ArtifactLoader | None = None,
        hasher: Callable[[ArtifactVersion], str] | None = None,
        value: Any = None,
    ) -> None:
        self.id = id
        self.name = name
        self.uri = uri
        self.materializer = materializer
        self.data_type = data_type
        self._content_hash = content_hash
        self._hasher = hasher
        self.size = size
        self.producer_step_run_id = producer_step_run_id
        self.python_version = python_version
        self._loader = loader
        self._value = value

    @property
    def content_hash(self) -> str:
        """The sha256 of the artifact's stored content (computed on first use in memory)."""
        if self._content_hash is None:
            if self._hasher is None:
                raise RuntimeError(f"artifact {self.id} has no content hash")
            self._content_hash = self._hasher(self)
            self._hasher = None
        return self._content_hash

    async def aload(self) -> Any:
        """Load the stored value without blocking the event loop."""
        if self._loader is None:
            return self._value
        # flowcore's own daemon threads, not the loop's default executor, which `asyncio.run`
        # joins: an abandoned load must not delay the exit of a cancelled `pipeline()` call.
        from flowcore._threads import run_in_worker_thread

        return await run_in_worker_thread(self._loader, self)

    def load(self) -> Any:
        """Load the stored value from synchronous code."""
        if self._loader is None:
            return self._value
        return self._loader(self)

    def __repr__(self) -> str:
        return f"<ArtifactVersion {self.name} {self.data_type} {self.uri}>"


class StepRun:
    """One invocation of one step inside a pipeline run."""

    __slots__ = (
        "attempts",
        "cache_components",
        "cache_key",
        "cache_miss_reason",
        "config",
        "end_time",
        "error",
        "hook_errors",
        "id",
        "logs",
        "name",
        "outputs",
        "pipeline_run_id",
        "start_time",
        "status",
        "step_name",
        "upstream",
        "waited",
    )

    def __init__(
        self,
        *,
        id: str,
        name: str,
        step_name: str,
        pipeline_run_id: str,
        config: StepRunConfig,
        status: StepStatus = StepStatus.PENDING,
    ) -> None:
        self.id = id
        self.name = name
        self.step_name = step_name
        self.pipeline_run_id = pipeline_run_id
        self.config = config
        self.status = status
        self.attempts = 0
        self.cache_key: str | None = None
        # The digest of each part of the cache key ("code", "parameter:lr", "input:data", ...),
        # kept so a later miss can say which part changed.
        self.cache_components: dict[str, str] | None = None
        self.cache_miss_reason: str | None = None
        self.start_time: datetime | None = None
        self.end_time: datetime | None = None
        self.error: ErrorInfo | None = None
        self.hook_errors: list[HookError] = []
        self.outputs: dict[str, ArtifactVersion] = {}
        # Seconds spent waiting for a pool slot (API.md §16).
        self.waited = 0.0
        # What the step printed and logged while it ran (None: not captured or not loaded;
        # runs read back from SQLite load it with Client.get_step_logs).
        self.logs: str | None = None
        # Invocation IDs this step waited for (data and order dependencies).
        self.upstream: tuple[str, ...] = ()

    @property
    def output(self) -> ArtifactVersion:
        """The single output of this step run."""
        if len(self.outputs) != 1:
            from flowcore.exceptions import StepOutputError

            raise StepOutputError(
                f"step run '{self.name}' has {len(self.outputs)} outputs "
                f"({', '.join(self.outputs) or 'none'}); use .outputs[name]"
            )
        return next(iter(self.outputs.values()))

    @property
    def attempt(self) -> int:
        """The current (or last) attempt, counting from 1."""
        return max(self.attempts, 1)

    @property
    def duration(self) -> float | None:
        """Seconds between start and end, or None while unknown."""
        if self.start_time is None or self.end_time is None:
            return None
        return (self.end_time - self.start_time).total_seconds()

    def __repr__(self) -> str:
        extra = f" attempts={self.attempts}" if self.attempts > 1 else ""
        err = f" error={self.error}" if self.error else ""
        return f"<StepRun {self.name} {self.status.value.upper()}{extra}{err}>"


class PipelineRun:
    """One run of a pipeline: its status, timings and its step runs by invocation ID."""

    __slots__ = (
        "end_time",
        "id",
        "name",
        "parameters",
        "pipeline_name",
        "resumed_from",
        "source",
        "start_time",
        "status",
        "steps",
        "unlisted",
    )

    def __init__(
        self,
        *,
        id: str,
        name: str,
        pipeline_name: str,
        start_time: datetime,
        status: RunStatus = RunStatus.RUNNING,
        parameters: Mapping[str, Any] | None = None,
        unlisted: bool = False,
    ) -> None:
        self.id = id
        self.name = name
        self.pipeline_name = pipeline_name
        self.status = status
        self.start_time = start_time
        self.end_time: datetime | None = None
        self.steps: dict[str, StepRun] = {}
        self.parameters: dict[str, Any] = dict(parameters or {})
        self.unlisted = unlisted
        # The id of the run this one resumed (API.md §14), and where its pipeline is defined
        # (`module:qualname`), so `flowcore runs resume` can import it again.
        self.resumed_from: str | None = None
        self.source: str | None = None

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for s in self.steps.values():
            counts[s.status.value] = counts.get(s.status.value, 0) + 1
        parts = " ".join(f"{n} {k}" for k, n in counts.items())
        return f"<PipelineRun {self.name} {self.status.value.upper()}{' ' + parts if parts else ''}>"
