"""How a run's statuses look and read, once, for every display (CLI, live progress, report).

Each status has one look: a colour for HTML, a rich style for the terminal and an icon; and
durations, status counts and error summaries are formatted the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flowcore._models import StepRun

__all__ = [
    "LOOKS",
    "STATUS_COLORS",
    "STATUS_ORDER",
    "WAIT_NOTICED",
    "StatusLook",
    "count_statuses",
    "error_line",
    "format_counts",
    "format_duration",
    "format_waited",
    "shorten",
    "status_color",
    "status_icon",
    "status_style",
    "waited_noticeably",
]


@dataclass(frozen=True)
class StatusLook:
    """How one status is shown: `color` in HTML, `style` in rich, `icon` in the live table."""

    color: str
    style: str
    icon: str


LOOKS: Mapping[str, StatusLook] = {
    "completed": StatusLook("#2f9e5b", "green", "✔"),
    "cached": StatusLook("#3478c6", "blue", "●"),
    "failed": StatusLook("#d64545", "bold red", "✖"),
    "retrying": StatusLook("#e39b17", "yellow", "↻"),
    # The live table draws a spinner for running steps instead of an icon.
    "running": StatusLook("#8a5cd6", "magenta", ""),
    "stopped": StatusLook("#6b6b6b", "bright_black", "■"),
    "skipped": StatusLook("#b4b4b4", "dim", "–"),
    "pending": StatusLook("#d0d0d0", "dim", "·"),
    # Runs only: the process that ran it died.
    "crashed": StatusLook("#8b1e1e", "bold red", "✖"),
}

STATUS_COLORS: Mapping[str, str] = {status: look.color for status, look in LOOKS.items()}

# The order statuses are counted in ("3 completed, 1 cached, 1 failed").
STATUS_ORDER = ("completed", "cached", "failed", "stopped", "skipped", "retrying", "running",
                "pending")

_UNKNOWN = StatusLook("#999", "", "")


def status_color(status: str) -> str:
    """The HTML colour of a status (grey for one this version does not know)."""
    return LOOKS.get(status, _UNKNOWN).color


def status_style(status: str) -> str:
    """The rich style of a status ("" for one this version does not know)."""
    return LOOKS.get(status, _UNKNOWN).style


def status_icon(status: str) -> str:
    """The live table's icon for a status ("" for one this version does not know)."""
    return LOOKS.get(status, _UNKNOWN).icon


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
    """Seconds as a short human string: `0.012s`, `4.20s`, `3m 05s`, `1h 02m` (None: `-`)."""
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


# Taking a free pool slot costs a store round trip (a few ms on SQLite) and is recorded as
# waiting; below this a step did not wait for another holder, and no display mentions it.
WAIT_NOTICED = 0.005


def waited_noticeably(seconds: float | None) -> bool:
    """True when a step waited long enough for a pool slot to be worth showing."""
    return seconds is not None and seconds >= WAIT_NOTICED


def format_waited(seconds: float | None) -> str:
    """`waited 1.20s` for a step that waited for a pool slot ("" for one that did not)."""
    return f"waited {format_duration(seconds)}" if waited_noticeably(seconds) else ""


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_line(step_run: StepRun) -> str:
    """A step's error as one line, `Type: first line of the message` ("" without an error)."""
    if step_run.error is None:
        return ""
    lines = (step_run.error.message or "").strip().splitlines()
    return f"{step_run.error.type}: {lines[0]}" if lines else step_run.error.type
