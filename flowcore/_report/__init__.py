"""A run as one self-contained HTML file: the DAG as SVG, a timeline of the steps, the errors.

The layout is computed in Python (`_layout`: layers by longest path from the roots) and drawn as
inline SVG (`_svg`); the page has only inline CSS and a few lines of inline JavaScript for the
hover cards (`_assets`), so it opens offline. Time a step spent waiting for a pool slot is a
hatched segment at the start of its timeline bar. Colours and formats come from `flowcore._runview`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowcore._models import PipelineRun, StepRun, StepStatus
from flowcore._report._assets import CSS, JS
from flowcore._report._layout import dag_edges, layers, max_parallelism, ordered_steps, run_bounds
from flowcore._report._svg import dag_svg, e, gantt_svg
from flowcore._runview import (
    LOOKS,
    count_statuses,
    error_line,
    format_counts,
    format_duration,
    shorten,
    status_color,
    waited_noticeably,
)

__all__ = [
    "dag_edges",
    "layers",
    "max_parallelism",
    "ordered_steps",
    "render_report",
    "write_report",
]


def _status(s: StepRun | PipelineRun) -> str:
    return s.status.value


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat(timespec="milliseconds") if dt else None


def _when(dt: datetime | None) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC" if dt else "-"


def _step_data(run: PipelineRun) -> dict[str, dict[str, Any]]:
    t0, _ = run_bounds(run)
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
            "waited": format_duration(s.waited) if waited_noticeably(s.waited) else None,
            "cache_key": s.cache_key,
            "error": str(s.error) if s.error else None,
            "upstream": list(getattr(s, "upstream", ()) or ()),
        }
    return data


def _legend(statuses: Iterable[str]) -> str:
    present = set(statuses)
    items = [f'<span><i style="background:{look.color}"></i>{e(k)}</span>'
             for k, look in LOOKS.items() if k in present and k != "crashed"]
    return f'<div class="legend">{"".join(items)}</div>'


def _timeline_legend(run: PipelineRun) -> str:
    # Only a run with pooled steps that waited has anything to explain.
    if not any(waited_noticeably(s.waited) for s in run.steps.values()):
        return ""
    return ('<div class="legend" id="timeline-legend"><span><i class="waiting"></i>'
            "waiting for a pool slot</span></div>")


def _waited_cell(s: StepRun) -> str:
    return format_duration(s.waited) if waited_noticeably(s.waited) else ""


def _steps_table(run: PipelineRun) -> str:
    t0, _ = run_bounds(run)
    pooled = any(waited_noticeably(s.waited) for s in run.steps.values())
    rows = []
    for s in ordered_steps(run):
        color = status_color(_status(s))
        offset = f"+{(s.start_time - t0).total_seconds():.3f}s" if s.start_time else "-"
        cached = "yes" if s.status is StepStatus.CACHED else ""
        rows.append(
            f'<tr data-row="{e(s.name)}"><td>{e(s.name)}</td>'
            f'<td><span class="pill" style="background:{color}">{e(_status(s))}</span></td>'
            f'<td class="num">{s.attempts}</td><td class="num">{offset}</td>'
            f'<td class="num">{e(format_duration(s.duration))}</td>'
            + (f'<td class="num">{e(_waited_cell(s))}</td>' if pooled else "")
            + f"<td>{cached}</td>"
            f"<td>{e(shorten(error_line(s), 120))}</td></tr>"
        )
    head = ("<tr><th>step</th><th>status</th><th>attempts</th><th>start</th><th>duration</th>"
            + ("<th>waited</th>" if pooled else "") + "<th>cached</th><th>error</th></tr>")
    return f'<table id="steps">{head}{"".join(rows)}</table>'


def _errors(run: PipelineRun) -> str:
    failed = [s for s in ordered_steps(run) if s.error is not None]
    if not failed:
        return ""
    parts = ["<h2>Errors</h2>"]
    for s in failed:
        parts.append(
            f'<details class="error" open><summary><b>{e(s.name)}</b> — {e(s.error)}</summary>'
            f"<pre>{e(s.error.traceback if s.error else '')}</pre></details>"
        )
    return "".join(parts)


def render_report(run: PipelineRun, *, generated_at: datetime | None = None) -> str:
    """The run as one self-contained HTML page (no external resources)."""
    from flowcore import __version__

    t0, t1 = run_bounds(run)
    duration = (t1 - t0).total_seconds() if run.end_time else None
    counts = count_statuses(_status(s) for s in run.steps.values())
    count_text = format_counts(counts)
    run_color = status_color(_status(run))
    dag, has_edges = dag_svg(run)
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
    facts_html = "".join(f"<div><span>{e(k)}</span>{e(v)}</div>" for k, v in facts)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{e(run.name)} · flowcore run report</title>
<style>{CSS}</style>
</head>
<body>
<h1>{e(run.name)} <span class="pill" id="run-status" style="background:{run_color}">{e(_status(run))}</span></h1>
<div class="facts">{facts_html}</div>
<h2>Graph</h2>
{_legend(counts)}
{note}
<div class="scroll">{dag}</div>
<h2>Timeline</h2>
{_timeline_legend(run)}
<div class="scroll">{gantt_svg(run)}</div>
<h2>Steps</h2>
{_steps_table(run)}
{_errors(run)}
<p class="muted">Generated by flowcore {e(__version__)} at {e(generated)}.</p>
<div id="tip" role="tooltip"></div>
<script type="application/json" id="step-data">{data}</script>
<script>{JS}</script>
</body>
</html>
"""  # noqa: E501


def write_report(run: PipelineRun, path: str | Path) -> Path:
    """Write the report of `run` to `path` (parent directories are created) and return it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_report(run), encoding="utf-8")
    return target
