"""Where a run's steps go in the report: its edges, columns (longest path from a root, or
waves in time when no edges were stored), rows, and the run's time bounds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flowcore._models import PipelineRun, StepRun, StepStatus

__all__ = [
    "NODE_H",
    "NODE_W",
    "PAD",
    "Box",
    "body_start",
    "dag_edges",
    "executing",
    "layers",
    "layout",
    "map_parent",
    "max_parallelism",
    "ordered_steps",
    "run_bounds",
    "start_key",
]

NODE_W, NODE_H, COL_GAP, ROW_GAP, PAD = 170, 48, 46, 14, 16


def map_parent(name: str) -> str | None:
    """The `.map()` node an element `node[k]` belongs to, or None for any other step."""
    if name.endswith("]") and "[" in name:
        return name[: name.rindex("[")]
    return None


def dag_edges(run: PipelineRun) -> dict[str, tuple[str, ...]] | None:
    """Each step's upstream invocation IDs, or None when the run recorded no edges.

    A `.map()` node is drawn as the gather of its elements: `split -> f[k] -> f -> combine`.
    """
    steps = run.steps
    up: dict[str, tuple[str, ...]] = {
        name: tuple(u for u in getattr(sr, "upstream", ()) or () if u in steps and u != name)
        for name, sr in steps.items()
    }
    elements: dict[str, list[str]] = {}
    for name in steps:
        parent = map_parent(name)
        if parent is not None and parent in steps:
            elements.setdefault(parent, []).append(name)
    if not any(up.values()):
        # No recorded edges (runs stored before edges were kept, or a one-step run). A run
        # of one step, or only elements of one map, still has a picture to draw.
        if len(steps) > 1 and not elements:
            return None
    for parent, kids in elements.items():
        for kid in kids:
            if not up[kid]:
                up[kid] = up[parent]
        up[parent] = tuple(kids)
    return up


def _time_waves(steps: Sequence[StepRun]) -> dict[str, int]:
    # Without edges: a step that started after some step of the current wave had ended may
    # depend on it, so it opens the next wave; steps that overlap every step of a wave share it.
    timed = sorted((s for s in steps if s.start_time is not None),
                   key=lambda s: (s.start_time, s.name))
    out: dict[str, int] = {}
    wave, wave_end = 0, None
    for s in timed:
        assert s.start_time is not None
        if wave_end is not None and s.start_time >= wave_end:
            wave, wave_end = wave + 1, None
        out[s.name] = wave
        end = s.end_time or s.start_time
        wave_end = end if wave_end is None else min(wave_end, end)
    last = (max(out.values()) + 1) if out else 0
    for s in steps:
        out.setdefault(s.name, last)
    return out


def layers(run: PipelineRun, edges: Mapping[str, Sequence[str]] | None = None) -> dict[str, int]:
    """Each step's column: its longest path from a root (or time waves without edges)."""
    if edges is None:
        edges = dag_edges(run)
    if edges is None:
        return _time_waves(list(run.steps.values()))
    depth: dict[str, int] = {}
    visiting: set[str] = set()

    def visit(name: str) -> int:
        if name in depth:
            return depth[name]
        if name in visiting:  # a cycle cannot be stored, but a report must never hang
            return 0
        visiting.add(name)
        d = max((visit(u) + 1 for u in edges.get(name, ())), default=0)
        visiting.discard(name)
        depth[name] = d
        return d

    for name in run.steps:
        visit(name)
    return depth


def start_key(s: StepRun) -> tuple[int, str, str]:
    """Sorts steps by start time (unstarted ones last), then name."""
    return (0 if s.start_time else 1, s.start_time.isoformat() if s.start_time else "", s.name)


def ordered_steps(run: PipelineRun) -> list[StepRun]:
    """The steps in graph order: by layer, then start time, then name."""
    depth = layers(run)
    return sorted(run.steps.values(), key=lambda s: (depth.get(s.name, 0), *start_key(s)))


@dataclass
class Box:
    """A step's box in the graph: its top-left corner."""

    step: StepRun
    x: float
    y: float


def layout(run: PipelineRun, edges: Mapping[str, Sequence[str]] | None) -> dict[str, Box]:
    """Each step's box: its layer is the column, rows ordered to keep edges short."""
    depth = layers(run, edges)
    columns: dict[int, list[StepRun]] = {}
    for s in run.steps.values():
        columns.setdefault(depth[s.name], []).append(s)
    row_of: dict[str, float] = {}
    boxes: dict[str, Box] = {}
    for col in sorted(columns):
        members = columns[col]

        def key(s: StepRun) -> tuple[float, tuple[int, str, str]]:
            # Barycentre of the parents' rows keeps edges short; then time, then name.
            ups = [row_of[u] for u in (edges or {}).get(s.name, ()) if u in row_of]
            return (sum(ups) / len(ups) if ups else 0.0, start_key(s))

        members.sort(key=key)
        for r, s in enumerate(members):
            row_of[s.name] = float(r)
            boxes[s.name] = Box(s, PAD + col * (NODE_W + COL_GAP), PAD + r * (NODE_H + ROW_GAP))
    return boxes


def run_bounds(run: PipelineRun) -> tuple[datetime, datetime]:
    """From the first start to the last end (now, for a run still going)."""
    start = run.start_time
    ends = [s.end_time for s in run.steps.values() if s.end_time is not None]
    starts = [s.start_time for s in run.steps.values() if s.start_time is not None]
    if starts:
        start = min([start, *starts])
    end = run.end_time or max(ends, default=None) or datetime.now(UTC)
    end = max([end, *ends]) if ends else end
    return start, end


def executing(steps: Iterable[StepRun]) -> list[StepRun]:
    """Steps that ran a body over an interval: not cached or skipped ones, and not the gather
    node of a `.map()` (its elements are what executed)."""
    steps = list(steps)
    parents = {p for p in (map_parent(s.name) for s in steps) if p is not None}
    return [s for s in steps if s.start_time is not None and s.end_time is not None
            and s.status not in (StepStatus.CACHED, StepStatus.SKIPPED) and s.name not in parents]


def body_start(s: StepRun) -> datetime:
    """When a timed step stopped waiting for a pool slot: its start plus what it waited.

    A step's span begins before it asks for a slot, so its wait is drawn at the start of the
    span. (A retried step waits again before each attempt; its waits are added up here.)
    """
    assert s.start_time is not None
    span = s.duration if s.duration is not None else s.waited
    return s.start_time + timedelta(seconds=min(max(s.waited, 0.0), span))


def max_parallelism(steps: Iterable[StepRun]) -> int:
    """The most steps that were executing at one moment (cached and skipped ones excluded;
    time spent waiting for a pool slot is not executing)."""
    points: list[tuple[datetime, int]] = []
    for s in executing(steps):
        assert s.start_time is not None and s.end_time is not None
        points.append((body_start(s), 1))
        points.append((s.end_time, -1))
    points.sort(key=lambda p: (p[0], p[1]))
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best
