"""The report's two pictures as inline SVG: the DAG and the timeline of the steps."""

from __future__ import annotations

import html
import math
from typing import Any

from flowcore._models import PipelineRun, StepRun, StepStatus
from flowcore._report._layout import (
    NODE_H,
    NODE_W,
    PAD,
    body_start,
    dag_edges,
    executing,
    layout,
    max_parallelism,
    run_bounds,
    start_key,
)
from flowcore._runview import format_duration, format_waited, shorten, status_color

__all__ = ["dag_svg", "e", "gantt_svg", "node_caption"]


def e(text: Any) -> str:
    """`text` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


def _status(s: StepRun | PipelineRun) -> str:
    return s.status.value


def node_caption(s: StepRun) -> str:
    """`completed · 4.20s · 2 attempts`: the line under a step's name."""
    parts = [_status(s)]
    if s.status not in (StepStatus.CACHED, StepStatus.SKIPPED) and s.duration is not None:
        parts.append(format_duration(s.duration))
    if s.attempts > 1:
        parts.append(f"{s.attempts} attempts")
    return " · ".join(parts)


def dag_svg(run: PipelineRun) -> tuple[str, bool]:
    """The graph as SVG, and whether it was drawn from stored edges (else from time)."""
    edges = dag_edges(run)
    boxes = layout(run, edges)
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
                f'<path class="edge" data-from="{e(u)}" data-to="{e(name)}" '
                f'd="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
                'marker-end="url(#arrow)"/>'
            )
    for name, b in boxes.items():
        s = b.step
        color = status_color(_status(s))
        out.append(
            f'<g class="node status-{_status(s)}" data-step="{e(name)}" tabindex="0" '
            f'transform="translate({b.x:.1f},{b.y:.1f})">'
            f"<title>{e(name)}: {e(node_caption(s))}</title>"
            f'<rect class="box" width="{NODE_W}" height="{NODE_H}" rx="7" fill="#fff" '
            f'stroke="{color}" stroke-width="2"/>'
            f'<rect width="7" height="{NODE_H}" rx="3" fill="{color}"/>'
            f'<text class="name" x="16" y="20">{e(shorten(name, 21))}</text>'
            f'<text class="caption" x="16" y="37" fill="{color}">{e(node_caption(s))}</text>'
        )
        if s.attempts > 1:
            out.append(
                f'<g class="retry-badge"><circle cx="{NODE_W - 14}" cy="14" r="10" '
                f'fill="{status_color("retrying")}"/><text x="{NODE_W - 14}" y="18" '
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


def gantt_svg(run: PipelineRun) -> str:
    """The timeline as SVG: one bar per step, and how many steps ran at once below."""
    steps = sorted(run.steps.values(), key=start_key)
    if not steps:
        return ""
    t0, t1 = run_bounds(run)
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
        "</pattern>"
        '<pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="2" height="6" fill="rgba(0,0,0,.3)"/>'
        "</pattern></defs>",
    ]
    grid_bottom = top + row_h * len(steps)
    for t in _axis_ticks(total):
        x = label_w + t * scale
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" '
                   f'y2="{grid_bottom + 4}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{top - 10}" text-anchor="middle">'
                   f"{e(format_duration(t) if t else '0s')}</text>")
    for r, s in enumerate(steps):
        y = top + r * row_h
        color = status_color(_status(s))
        out.append(f'<g class="bar status-{_status(s)}" data-step="{e(s.name)}" tabindex="0">')
        waited = format_waited(s.waited)
        title = node_caption(s) + (f" · {waited} for a pool slot" if waited else "")
        out.append(f"<title>{e(s.name)}: {e(title)}</title>")
        if r % 2 == 0:
            out.append(f'<rect class="zebra" x="0" y="{y}" width="{width}" height="{row_h}"/>')
        out.append(f'<text class="label" x="{label_w - 10}" y="{y + 16}" text-anchor="end">'
                   f"{e(shorten(s.name, 28))}</text>")
        start = s.start_time or s.end_time
        if start is None:
            out.append(f'<text class="note" x="{label_w + 4}" y="{y + 16}">'
                       f"{e(_status(s))}</text></g>")
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
            # The wait for a pool slot comes first in the span: a pale, hatched segment.
            wait_w = 0.0
            if waited:
                wait_w = min(max((body_start(s) - start).total_seconds() * scale, 1.5), w)
                out.append(
                    f'<g class="waiting"><rect x="{x:.1f}" y="{y + 4}" width="{wait_w:.1f}" '
                    f'height="{row_h - 8}" fill="{color}" fill-opacity=".3"/><rect x="{x:.1f}" '
                    f'y="{y + 4}" width="{wait_w:.1f}" height="{row_h - 8}" fill="url(#hatch)"/>'
                    "</g>")
            rx, rw = x + wait_w, max(w - wait_w, 1.0)
            out.append(f'<rect x="{rx:.1f}" y="{y + 4}" width="{rw:.1f}" height="{row_h - 8}" '
                       f'rx="3" fill="{color}"/>')
            if s.attempts > 1:
                out.append(f'<rect class="retries" x="{rx:.1f}" y="{y + 4}" width="{rw:.1f}" '
                           f'height="{row_h - 8}" rx="3" fill="url(#stripes)"/>')
            note = format_duration(s.duration)
            if waited:
                note += f" · {waited}"
            if s.attempts > 1:
                note += f" · {s.attempts} attempts"
            if s.status is not StepStatus.COMPLETED:
                note += f" · {_status(s)}"
        out.append(f'<text class="note" x="{x + w + 6:.1f}" y="{y + 16}">{e(note)}</text></g>')
    # Concurrency: how many steps were executing over time.
    cy0 = grid_bottom + 16
    events: list[tuple[float, int]] = []
    for s in executing(steps):
        assert s.start_time is not None and s.end_time is not None
        events.append(((body_start(s) - t0).total_seconds(), 1))
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
