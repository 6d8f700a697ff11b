"""A run as one self-contained HTML file: the DAG as SVG, a timeline of the steps, the errors.

The layout is computed here in Python (layers by longest path from the roots); the page has
only inline CSS and a few lines of inline JavaScript for the hover cards, so it opens offline.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowcore._models import PipelineRun, StepRun, StepStatus

__all__ = [
    "STATUS_COLORS",
    "STATUS_ORDER",
    "count_statuses",
    "dag_edges",
    "format_counts",
    "format_duration",
    "layers",
    "max_parallelism",
    "ordered_steps",
    "render_report",
    "write_report",
]

STATUS_COLORS: dict[str, str] = {
    "completed": "#2f9e5b",
    "cached": "#3478c6",
    "failed": "#d64545",
    "retrying": "#e39b17",
    "running": "#8a5cd6",
    "stopped": "#6b6b6b",
    "skipped": "#b4b4b4",
    "pending": "#d0d0d0",
    # run statuses
    "crashed": "#8b1e1e",
}

# The order statuses are counted in ("3 completed, 1 cached, 1 failed").
STATUS_ORDER = ("completed", "cached", "failed", "stopped", "skipped", "retrying", "running",
                "pending")

NODE_W, NODE_H, COL_GAP, ROW_GAP, PAD = 170, 48, 46, 14, 16


def count_statuses(statuses: Iterable[str]) -> dict[str, int]:
    """How many of each status, in STATUS_ORDER (unknown ones last)."""
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    rank = {k: i for i, k in enumerate(STATUS_ORDER)}
    return dict(sorted(counts.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def format_counts(counts: Mapping[str, int]) -> str:
    """`3 completed, 1 cached, 1 failed` (or `no steps`)."""
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "no steps"


def format_duration(seconds: float | None) -> str:
    """Seconds as a short human string: `0.012s`, `4.20s`, `3m 05s`, `1h 02m`."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


# -- the graph -----------------------------------------------------------------------------


def _map_parent(name: str) -> str | None:
    # `.map()` elements are named `node[k]`.
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
        parent = _map_parent(name)
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


def _start_key(s: StepRun) -> tuple[int, str, str]:
    return (0 if s.start_time else 1, s.start_time.isoformat() if s.start_time else "", s.name)


def ordered_steps(run: PipelineRun) -> list[StepRun]:
    """The steps in graph order: by layer, then start time, then name."""
    depth = layers(run)
    return sorted(run.steps.values(), key=lambda s: (depth.get(s.name, 0), *_start_key(s)))


@dataclass
class _Box:
    step: StepRun
    x: float
    y: float


def _layout(run: PipelineRun, edges: Mapping[str, Sequence[str]] | None) -> dict[str, _Box]:
    depth = layers(run, edges)
    columns: dict[int, list[StepRun]] = {}
    for s in run.steps.values():
        columns.setdefault(depth[s.name], []).append(s)
    row_of: dict[str, float] = {}
    boxes: dict[str, _Box] = {}
    for col in sorted(columns):
        members = columns[col]

        def key(s: StepRun) -> tuple[float, tuple[int, str, str]]:
            # Barycentre of the parents' rows keeps edges short; then time, then name.
            ups = [row_of[u] for u in (edges or {}).get(s.name, ()) if u in row_of]
            return (sum(ups) / len(ups) if ups else 0.0, _start_key(s))

        members.sort(key=key)
        for r, s in enumerate(members):
            row_of[s.name] = float(r)
            boxes[s.name] = _Box(s, PAD + col * (NODE_W + COL_GAP), PAD + r * (NODE_H + ROW_GAP))
    return boxes


# -- rendering -----------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _status(s: StepRun | PipelineRun) -> str:
    return s.status.value


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_line(s: StepRun) -> str:
    if s.error is None:
        return ""
    first = (s.error.message or "").strip().splitlines()
    return f"{s.error.type}: {first[0]}" if first else s.error.type


def _node_caption(s: StepRun) -> str:
    parts = [_status(s)]
    if s.status not in (StepStatus.CACHED, StepStatus.SKIPPED) and s.duration is not None:
        parts.append(format_duration(s.duration))
    if s.attempts > 1:
        parts.append(f"{s.attempts} attempts")
    return " · ".join(parts)


def _dag_svg(run: PipelineRun) -> tuple[str, bool]:
    edges = dag_edges(run)
    boxes = _layout(run, edges)
    if not boxes:
        return '<p class="muted">This run has no steps.</p>', edges is not None
    width = max(b.x for b in boxes.values()) + NODE_W + PAD
    height = max(b.y for b in boxes.values()) + NODE_H + PAD
    out = [
        f'<svg id="dag" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        f'aria-label="pipeline graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#8a8f98"/></marker></defs>',
    ]
    for name, ups in (edges or {}).items():
        dst = boxes[name]
        for u in ups:
            src = boxes[u]
            x1, y1 = src.x + NODE_W, src.y + NODE_H / 2
            x2, y2 = dst.x - 2, dst.y + NODE_H / 2
            mid = (x1 + x2) / 2
            out.append(
                f'<path class="edge" data-from="{_e(u)}" data-to="{_e(name)}" '
                f'd="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
                'marker-end="url(#arrow)"/>'
            )
    for name, b in boxes.items():
        s = b.step
        color = STATUS_COLORS.get(_status(s), "#999")
        out.append(
            f'<g class="node status-{_status(s)}" data-step="{_e(name)}" tabindex="0" '
            f'transform="translate({b.x:.1f},{b.y:.1f})">'
            f"<title>{_e(name)}: {_e(_node_caption(s))}</title>"
            f'<rect class="box" width="{NODE_W}" height="{NODE_H}" rx="7" fill="#fff" '
            f'stroke="{color}" stroke-width="2"/>'
            f'<rect width="7" height="{NODE_H}" rx="3" fill="{color}"/>'
            f'<text class="name" x="16" y="20">{_e(_short(name, 21))}</text>'
            f'<text class="caption" x="16" y="37" fill="{color}">{_e(_node_caption(s))}</text>'
        )
        if s.attempts > 1:
            out.append(
                f'<g class="retry-badge"><circle cx="{NODE_W - 14}" cy="14" r="10" '
                f'fill="{STATUS_COLORS["retrying"]}"/><text x="{NODE_W - 14}" y="18" '
                f'text-anchor="middle" class="badge">×{s.attempts}</text></g>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "".join(out), edges is not None


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    exp = math.floor(math.log10(raw))
    base = 10.0**exp
    for m in (1, 2, 2.5, 5, 10):
        if m * base >= raw:
            return m * base
    return 10 * base


def _axis_ticks(total: float) -> list[float]:
    if total <= 0:
        return [0.0]
    step = _nice_step(total / 6)
    count = int(total / step + 1e-9)
    return [round(k * step, 9) for k in range(count + 1)]


def _run_bounds(run: PipelineRun) -> tuple[datetime, datetime]:
    start = run.start_time
    ends = [s.end_time for s in run.steps.values() if s.end_time is not None]
    starts = [s.start_time for s in run.steps.values() if s.start_time is not None]
    if starts:
        start = min([start, *starts])
    end = run.end_time or max(ends, default=None) or datetime.now(UTC)
    end = max([end, *ends]) if ends else end
    return start, end


def _executing(steps: Iterable[StepRun]) -> list[StepRun]:
    # Steps that ran a body over an interval: not cached or skipped ones, and not the gather
    # node of a `.map()` (its elements are what executed).
    steps = list(steps)
    parents = {p for p in (_map_parent(s.name) for s in steps) if p is not None}
    return [s for s in steps if s.start_time is not None and s.end_time is not None
            and s.status not in (StepStatus.CACHED, StepStatus.SKIPPED) and s.name not in parents]


def max_parallelism(steps: Iterable[StepRun]) -> int:
    """The most steps that were executing at one moment (cached and skipped ones excluded)."""
    points: list[tuple[datetime, int]] = []
    for s in _executing(steps):
        assert s.start_time is not None and s.end_time is not None
        points.append((s.start_time, 1))
        points.append((s.end_time, -1))
    points.sort(key=lambda p: (p[0], p[1]))
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def _gantt_svg(run: PipelineRun) -> str:
    steps = sorted(run.steps.values(), key=_start_key)
    if not steps:
        return ""
    t0, t1 = _run_bounds(run)
    total = max((t1 - t0).total_seconds(), 1e-3)
    label_w, chart_w, row_h, top = 210, 720, 24, 28
    scale = chart_w / total
    conc_h = 46
    height = top + row_h * len(steps) + 16 + conc_h + 24
    width = label_w + chart_w + 130
    out = [
        f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="timeline">',
        '<defs><pattern id="stripes" width="8" height="8" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="4" height="8" fill="rgba(255,255,255,.35)"/>'
        "</pattern></defs>",
    ]
    grid_bottom = top + row_h * len(steps)
    for t in _axis_ticks(total):
        x = label_w + t * scale
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" '
                   f'y2="{grid_bottom + 4}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{top - 10}" text-anchor="middle">'
                   f"{_e(format_duration(t) if t else '0s')}</text>")
    for r, s in enumerate(steps):
        y = top + r * row_h
        color = STATUS_COLORS.get(_status(s), "#999")
        out.append(f'<g class="bar status-{_status(s)}" data-step="{_e(s.name)}" tabindex="0">')
        out.append(f"<title>{_e(s.name)}: {_e(_node_caption(s))}</title>")
        if r % 2 == 0:
            out.append(f'<rect class="zebra" x="0" y="{y}" width="{width}" height="{row_h}"/>')
        out.append(f'<text class="label" x="{label_w - 10}" y="{y + 16}" text-anchor="end">'
                   f"{_e(_short(s.name, 28))}</text>")
        start = s.start_time or s.end_time
        if start is None:
            out.append(f'<text class="note" x="{label_w + 4}" y="{y + 16}">'
                       f"{_e(_status(s))}</text></g>")
            continue
        x = label_w + (start - t0).total_seconds() * scale
        end = s.end_time or t1
        w = max((end - start).total_seconds() * scale, 2.0)
        note = ""
        if s.status is StepStatus.CACHED:
            cx, cy = x + 5, y + row_h / 2
            out.append(f'<path d="M{cx - 6:.1f},{cy:.1f} L{cx:.1f},{cy - 6:.1f} '
                       f'L{cx + 6:.1f},{cy:.1f} L{cx:.1f},{cy + 6:.1f} z" fill="{color}"/>')
            note = "cached"
            w = 12.0
        elif s.status is StepStatus.SKIPPED:
            note = "skipped"
            w = 0.0
        else:
            out.append(f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" '
                       f'rx="3" fill="{color}"/>')
            if s.attempts > 1:
                out.append(f'<rect class="retries" x="{x:.1f}" y="{y + 4}" width="{w:.1f}" '
                           f'height="{row_h - 8}" rx="3" fill="url(#stripes)"/>')
            note = format_duration(s.duration)
            if s.attempts > 1:
                note += f" · {s.attempts} attempts"
            if s.status is not StepStatus.COMPLETED:
                note += f" · {_status(s)}"
        out.append(f'<text class="note" x="{x + w + 6:.1f}" y="{y + 16}">{_e(note)}</text></g>')
    # Concurrency: how many steps were executing over time.
    cy0 = grid_bottom + 16
    events: list[tuple[float, int]] = []
    for s in _executing(steps):
        assert s.start_time is not None and s.end_time is not None
        events.append(((s.start_time - t0).total_seconds(), 1))
        events.append(((s.end_time - t0).total_seconds(), -1))
    events.sort()
    peak = max_parallelism(steps)
    if peak:
        unit = conc_h / peak
        pts = [f"{label_w:.1f},{cy0 + conc_h:.1f}"]
        cur = 0
        for t, d in events:
            x = label_w + t * scale
            pts.append(f"{x:.1f},{cy0 + conc_h - cur * unit:.1f}")
            cur += d
            pts.append(f"{x:.1f},{cy0 + conc_h - cur * unit:.1f}")
        pts.append(f"{label_w + chart_w:.1f},{cy0 + conc_h:.1f}")
        out.append(f'<polygon class="concurrency" points="{" ".join(pts)}"/>')
    out.append(f'<text class="label" x="{label_w - 10}" y="{cy0 + conc_h / 2 + 4:.1f}" '
               f'text-anchor="end">steps at once (max {peak})</text>')
    out.append(f'<line class="axis" x1="{label_w}" y1="{cy0 + conc_h}" '
               f'x2="{label_w + chart_w}" y2="{cy0 + conc_h}"/>')
    out.append("</svg>")
    return "".join(out)


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat(timespec="milliseconds") if dt else None


def _when(dt: datetime | None) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC" if dt else "-"


def _step_data(run: PipelineRun) -> dict[str, dict[str, Any]]:
    t0, _ = _run_bounds(run)
    data: dict[str, dict[str, Any]] = {}
    for name, s in run.steps.items():
        data[name] = {
            "name": name,
            "step": s.step_name,
            "status": _status(s),
            "attempts": s.attempts,
            "start": _iso(s.start_time),
            "end": _iso(s.end_time),
            "offset": round((s.start_time - t0).total_seconds(), 6) if s.start_time else None,
            "duration": format_duration(s.duration) if s.duration is not None else None,
            "cache_key": s.cache_key,
            "error": str(s.error) if s.error else None,
            "upstream": list(getattr(s, "upstream", ()) or ()),
        }
    return data


_CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0; padding: 24px 32px; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 16px; margin: 28px 0 10px; }
.muted { color: var(--muted); }
.pill { display: inline-block; padding: 1px 10px; border-radius: 999px; color: #fff;
        font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
.facts { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 12px 0 4px; }
.facts div span { display: block; font-size: 11px; text-transform: uppercase; color: var(--muted); }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; font-size: 12px; margin: 6px 0; }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 3px; margin-right: 5px;
            vertical-align: -1px; }
.scroll { overflow: auto; border: 1px solid var(--line); border-radius: 8px; background: var(--bg);
          padding: 8px; }
svg text { font-family: inherit; }
#dag .edge { fill: none; stroke: #8a8f98; stroke-width: 1.5; }
#dag .node { cursor: default; }
#dag .node:hover .box, #dag .node:focus .box { stroke-width: 3.5; }
#dag .name { font-size: 13px; font-weight: 600; fill: var(--fg); }
#dag .caption { font-size: 11.5px; }
#dag .badge { font-size: 11px; font-weight: 700; fill: #fff; }
#dag .status-skipped .box { stroke-dasharray: 5 4; }
#timeline .grid { stroke: var(--line); }
#timeline .axis { stroke: #8a8f98; }
#timeline .tick, #timeline .note { font-size: 11px; fill: var(--muted); }
#timeline .label { font-size: 12px; fill: var(--fg); }
#timeline .zebra { fill: rgba(0,0,0,.025); }
#timeline .bar:hover .label { font-weight: 700; }
#timeline .concurrency { fill: rgba(138,92,214,.28); stroke: #8a5cd6; stroke-width: 1; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { font-size: 11px; text-transform: uppercase; color: var(--muted); }
td.num { font-variant-numeric: tabular-nums; }
pre { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 10px;
      overflow: auto; font-size: 12px; max-height: 320px; }
#tip { position: fixed; pointer-events: none; z-index: 10; display: none; max-width: 420px;
       background: #1f2328; color: #fff; border-radius: 8px; padding: 10px 12px; font-size: 12px;
       box-shadow: 0 6px 20px rgba(0,0,0,.25); }
#tip b { font-size: 13px; }
#tip dl { margin: 6px 0 0; display: grid; grid-template-columns: auto 1fr; gap: 2px 10px; }
#tip dt { color: #9aa4b1; }
#tip dd { margin: 0; word-break: break-word; }
#tip .err { color: #ffb4b4; }
"""

_JS = """
(function () {
  var data = JSON.parse(document.getElementById("step-data").textContent);
  var tip = document.getElementById("tip");
  function row(dl, key, value, cls) {
    if (value === null || value === undefined || value === "") return;
    var dt = document.createElement("dt"); dt.textContent = key;
    var dd = document.createElement("dd"); dd.textContent = String(value);
    if (cls) dd.className = cls;
    dl.appendChild(dt); dl.appendChild(dd);
  }
  function show(name, x, y) {
    var s = data[name];
    if (!s) return;
    tip.textContent = "";
    var title = document.createElement("b"); title.textContent = s.name;
    tip.appendChild(title);
    var dl = document.createElement("dl");
    row(dl, "status", s.status);
    row(dl, "attempts", s.attempts);
    row(dl, "started", s.start);
    row(dl, "ended", s.end);
    row(dl, "after", s.offset === null ? null : "+" + s.offset.toFixed(3) + "s");
    row(dl, "duration", s.duration);
    row(dl, "cache key", s.cache_key ? s.cache_key.slice(0, 16) : null);
    row(dl, "upstream", s.upstream.join(", "));
    row(dl, "error", s.error, "err");
    tip.appendChild(dl);
    tip.style.display = "block";
    place(x, y);
  }
  function place(x, y) {
    var w = tip.offsetWidth, h = tip.offsetHeight;
    var left = Math.min(x + 14, window.innerWidth - w - 8);
    var top = y + 14 + h > window.innerHeight ? y - h - 10 : y + 14;
    tip.style.left = Math.max(left, 4) + "px"; tip.style.top = Math.max(top, 4) + "px";
  }
  function hide() { tip.style.display = "none"; }
  document.querySelectorAll("[data-step]").forEach(function (el) {
    var name = el.getAttribute("data-step");
    el.addEventListener("mouseenter", function (ev) { show(name, ev.clientX, ev.clientY); });
    el.addEventListener("mousemove", function (ev) { place(ev.clientX, ev.clientY); });
    el.addEventListener("mouseleave", hide);
    el.addEventListener("focus", function () {
      var r = el.getBoundingClientRect(); show(name, r.left + r.width / 2, r.bottom);
    });
    el.addEventListener("blur", hide);
  });
})();
"""


def _legend(statuses: Iterable[str]) -> str:
    present = set(statuses)
    items = [f'<span><i style="background:{c}"></i>{_e(k)}</span>'
             for k, c in STATUS_COLORS.items() if k in present and k != "crashed"]
    return f'<div class="legend">{"".join(items)}</div>'


def _steps_table(run: PipelineRun) -> str:
    t0, _ = _run_bounds(run)
    rows = []
    for s in ordered_steps(run):
        color = STATUS_COLORS.get(_status(s), "#999")
        offset = f"+{(s.start_time - t0).total_seconds():.3f}s" if s.start_time else "-"
        cached = "yes" if s.status is StepStatus.CACHED else ""
        rows.append(
            f'<tr data-row="{_e(s.name)}"><td>{_e(s.name)}</td>'
            f'<td><span class="pill" style="background:{color}">{_e(_status(s))}</span></td>'
            f'<td class="num">{s.attempts}</td><td class="num">{offset}</td>'
            f'<td class="num">{_e(format_duration(s.duration))}</td><td>{cached}</td>'
            f"<td>{_e(_short(_error_line(s), 120))}</td></tr>"
        )
    head = ("<tr><th>step</th><th>status</th><th>attempts</th><th>start</th><th>duration</th>"
            "<th>cached</th><th>error</th></tr>")
    return f'<table id="steps">{head}{"".join(rows)}</table>'


def _errors(run: PipelineRun) -> str:
    failed = [s for s in ordered_steps(run) if s.error is not None]
    if not failed:
        return ""
    parts = ["<h2>Errors</h2>"]
    for s in failed:
        parts.append(
            f'<details class="error" open><summary><b>{_e(s.name)}</b> — {_e(s.error)}</summary>'
            f"<pre>{_e(s.error.traceback if s.error else '')}</pre></details>"
        )
    return "".join(parts)


def render_report(run: PipelineRun, *, generated_at: datetime | None = None) -> str:
    """The run as one self-contained HTML page (no external resources)."""
    from flowcore import __version__

    t0, t1 = _run_bounds(run)
    duration = (t1 - t0).total_seconds() if run.end_time else None
    counts = count_statuses(_status(s) for s in run.steps.values())
    count_text = format_counts(counts)
    run_color = STATUS_COLORS.get(_status(run), "#999")
    dag, has_edges = _dag_svg(run)
    note = "" if has_edges else (
        '<p class="muted">This run was stored without its dependency edges: steps are placed '
        "by when they started.</p>")
    generated = (generated_at or datetime.now(UTC)).isoformat(timespec="seconds")
    data = json.dumps(_step_data(run)).replace("<", "\\u003c").replace(">", "\\u003e")
    facts = [
        ("pipeline", run.pipeline_name),
        ("run id", run.id),
        ("started", _when(run.start_time)),
        ("ended", _when(run.end_time)),
        ("duration", format_duration(duration)),
        ("steps", count_text),
        ("most steps at once", str(max_parallelism(run.steps.values()))),
    ]
    facts_html = "".join(f"<div><span>{_e(k)}</span>{_e(v)}</div>" for k, v in facts)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{_e(run.name)} · flowcore run report</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_e(run.name)} <span class="pill" id="run-status" style="background:{run_color}">{_e(_status(run))}</span></h1>
<div class="facts">{facts_html}</div>
<h2>Graph</h2>
{_legend(counts)}
{note}
<div class="scroll">{dag}</div>
<h2>Timeline</h2>
<div class="scroll">{_gantt_svg(run)}</div>
<h2>Steps</h2>
{_steps_table(run)}
{_errors(run)}
<p class="muted">Generated by flowcore {_e(__version__)} at {_e(generated)}.</p>
<div id="tip" role="tooltip"></div>
<script type="application/json" id="step-data">{data}</script>
<script>{_JS}</script>
</body>
</html>
"""  # noqa: E501


def write_report(run: PipelineRun, path: str | Path) -> Path:
    """Write the report of `run` to `path` (parent directories are created) and return it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_report(run), encoding="utf-8")
    return target
