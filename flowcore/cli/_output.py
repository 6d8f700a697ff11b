"""What the `flowcore` command writes: tables and lines (rich on a terminal, aligned plain text
elsewhere), JSON for scripts, and runs turned into table cells and JSON objects."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import IO, Any

from flowcore._models import PipelineRun, StepRun, StepStatus
from flowcore._report import ordered_steps
from flowcore._runview import (
    count_statuses,
    error_line,
    format_counts,
    format_duration,
    format_waited,
    shorten,
    status_style,
)

PROG = "flowcore"


def _rich_console(stream: IO[str]) -> Any:
    """A rich Console for a terminal, or None (not a terminal, or rich not installed)."""
    if not getattr(stream, "isatty", lambda: False)():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=stream, highlight=False)


class _Out:
    """Writes tables and lines: rich on a terminal, aligned plain text elsewhere."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.console = _rich_console(stream)

    def line(self, text: str = "", style: str | None = None) -> None:
        if self.console is not None:
            from rich.text import Text

            self.console.print(Text(text, style=style or ""))
        else:
            self.stream.write(text + "\n")

    def facts(self, pairs: Sequence[tuple[str, str]], styles: dict[str, str] | None = None,
              ) -> None:
        width = max(len(k) for k, _ in pairs)
        for key, value in pairs:
            if self.console is not None:
                from rich.text import Text

                self.console.print(Text.assemble((f"{key:<{width}}  ", "dim"),
                                                 (value, (styles or {}).get(key, ""))))
            else:
                self.stream.write(f"{key:<{width}}  {value}\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]],
              status_col: int | None = None) -> None:
        if self.console is not None:
            from rich.table import Table

            table = Table(box=None, header_style="bold dim", pad_edge=False)
            for h in headers:
                table.add_column(h.upper(), overflow="fold")
            for row in rows:
                cells: list[Any] = list(row)
                if status_col is not None:
                    from rich.text import Text

                    cells[status_col] = Text(row[status_col], style=status_style(row[status_col]))
                table.add_row(*cells)
            self.console.print(table)
            return
        widths = [len(h) for h in headers]
        for row in rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        for row in [[h.upper() for h in headers], *rows]:
            self.stream.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                              .rstrip() + "\n")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _err(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")


# -- runs as data ---------------------------------------------------------------------------


def _local(dt: datetime | None) -> str:
    return dt.astimezone().strftime("%Y-%m-%d %H:%M:%S") if dt else "-"


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def _run_duration(run: PipelineRun) -> float | None:
    if run.end_time is None:
        return None
    return (run.end_time - run.start_time).total_seconds()


def _counts(run: PipelineRun) -> dict[str, int]:
    return count_statuses(s.status.value for s in run.steps.values())


def _counts_text(run: PipelineRun) -> str:
    return format_counts(_counts(run))


def _error_summary(step_run: StepRun, limit: int = 80) -> str:
    return shorten(error_line(step_run), limit)


def _step_time(s: StepRun) -> str:
    """A step's duration for a table, with the part spent waiting for a pool slot:
    `1.20s (waited 0.80s)`."""
    waited = format_waited(s.waited)
    return format_duration(s.duration) + (f" ({waited})" if waited else "")


def _step_json(s: StepRun) -> dict[str, Any]:
    return {
        "name": s.name,
        "step": s.step_name,
        "status": s.status.value,
        "attempts": s.attempts,
        "start_time": _iso(s.start_time),
        "end_time": _iso(s.end_time),
        "duration": s.duration,
        "waited": s.waited,
        "cached": s.status is StepStatus.CACHED,
        "cache_key": s.cache_key,
        "error": None if s.error is None else {"type": s.error.type, "message": s.error.message},
        "upstream": list(getattr(s, "upstream", ()) or ()),
        "outputs": {name: a.id for name, a in s.outputs.items()},
    }


def _run_json(run: PipelineRun, *, steps: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": run.id,
        "name": run.name,
        "pipeline": run.pipeline_name,
        "status": run.status.value,
        "start_time": _iso(run.start_time),
        "end_time": _iso(run.end_time),
        "duration": _run_duration(run),
        "step_counts": _counts(run),
    }
    if steps:
        data["parameters"] = run.parameters
        data["steps"] = [_step_json(s) for s in ordered_steps(run)]
    return data
