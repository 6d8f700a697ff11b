"""A live view of runs in the terminal, driven by the runner's events (`flowcore._events`).

On a terminal with rich installed the view is a table redrawn in place (running, done, cached,
failed, retrying with a countdown); anywhere else it is one plain line per change, fit for
log files and CI output. `flowcore.progress()` turns it on. A step that waited for a pool
slot (API.md §16) says how long, when it starts and when it ends.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, TextIO

from flowcore import events
from flowcore._runview import (
    count_statuses,
    format_counts,
    format_duration,
    format_waited,
    status_icon,
    status_style,
)
from flowcore.context import get_step_context
from flowcore.exceptions import StepContextError

__all__ = ["Progress", "progress"]

def _clock(at: datetime) -> str:
    return at.astimezone().strftime("%H:%M:%S")


def _real_stream(stream: TextIO) -> TextIO:
    # Never write into a step's captured output: unwrap the capture tees if a run is active.
    from flowcore._capture import _Tee

    while isinstance(stream, _Tee):
        stream = stream._original
    return stream


def _waited(event: events.StepStarted | events.StepFinished) -> float:
    """Seconds the event's step has waited for pool slots so far (0.0 when unknown)."""
    carried = getattr(event, "waited", None)
    if isinstance(carried, float | int):
        return float(carried)
    # The events carry no wait: but the engine emits a step's events from inside that step's
    # own task, whose step context holds its StepRun with `waited` already added up.
    try:
        ctx = get_step_context()
    except StepContextError:
        return 0.0
    sr = ctx.step_run
    if ctx.pipeline_run.id != event.run_id or sr.name != event.step:
        return 0.0
    return sr.waited


@dataclass
class _StepState:
    name: str
    status: str = "pending"
    attempt: int = 0
    started: datetime | None = None
    ended: datetime | None = None
    retry_at: datetime | None = None
    error: str | None = None
    waited: float = 0.0


@dataclass
class _RunState:
    id: str
    name: str
    pipeline: str
    started: datetime
    steps: dict[str, _StepState] = field(default_factory=dict)
    status: str | None = None
    ended: datetime | None = None

    def step(self, name: str) -> _StepState:
        state = self.steps.get(name)
        if state is None:
            state = self.steps[name] = _StepState(name)
        return state

    def summary(self) -> str:
        return format_counts(count_statuses(s.status for s in self.steps.values()))


def _load_rich() -> Any:
    try:
        import rich.console
        import rich.live
        import rich.spinner
        import rich.table
        import rich.text
    except ImportError:
        return None
    return rich


class Progress:
    """A display of every run in this process; a context manager that turns itself off.

    Use `flowcore.progress()` to make one.
    """

    def __init__(self, stream: TextIO | None = None, live: bool | None = None,
                 refresh_per_second: float = 8.0) -> None:
        self._stream = _real_stream(stream if stream is not None else sys.stderr)
        is_tty = bool(getattr(self._stream, "isatty", lambda: False)())
        want_live = is_tty if live is None else live
        self._rich = _load_rich() if want_live else None
        self._refresh = refresh_per_second
        self._lock = threading.RLock()
        self._runs: dict[str, _RunState] = {}
        self._live: Any = None
        self._console: Any = None
        self._active = False
        if self._rich is not None:
            self._console = self._rich.console.Console(
                file=self._stream, force_terminal=True if live else None,
                width=None if is_tty else 110, highlight=False,
            )

    @property
    def live(self) -> bool:
        """True for the redrawn table (rich on a terminal), False for plain lines."""
        return self._rich is not None

    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> Progress:
        """Start receiving run events (done by `flowcore.progress()`)."""
        if not self._active:
            events.add_listener(self._on_event)
            self._active = True
        return self

    def close(self) -> None:
        """Stop the display: no more events; a live table shows its last state."""
        global _current
        events.remove_listener(self._on_event)
        self._active = False
        self._stop_live()
        with self._lock:
            self._runs.clear()
        if _current is self:
            _current = None

    def __enter__(self) -> Progress:
        # Already started by progress() (or left off by progress(False)).
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- events ------------------------------------------------------------------------

    def _on_event(self, event: events.Event) -> None:
        # The live table is started and stopped outside our lock: its refresh thread holds
        # the Live's own lock while it renders (and takes ours), so ours comes second always.
        finished = False
        with self._lock:
            if isinstance(event, events.RunStarted):
                run = _RunState(event.run_id, event.run_name, event.pipeline_name, event.at)
                for name in event.step_names:
                    run.step(name)
                self._runs[event.run_id] = run
                self._line(event.at, f"run {run.name} started: pipeline {run.pipeline}, "
                           f"{len(run.steps)} step{'s' if len(run.steps) != 1 else ''}")
            else:
                run_state = self._runs.get(event.run_id)
                if run_state is None:  # a run that began before the display did
                    return
                if isinstance(event, events.RunFinished):
                    run_state.status, run_state.ended = event.status, event.at
                    took = format_duration((event.at - run_state.started).total_seconds())
                    self._line(event.at, f"run {run_state.name} {event.status} in {took}: "
                               f"{run_state.summary()}")
                    finished = all(r.status is not None for r in self._runs.values())
                else:
                    self._step_event(run_state, event)
                    return
        if isinstance(event, events.RunStarted):
            self._start_live()
        elif finished:
            self._stop_live()
            with self._lock:
                self._runs = {k: r for k, r in self._runs.items() if r.status is None}
            if self._runs:
                self._start_live()

    def _step_event(self, run: _RunState, event: events.Event) -> None:
        prefix = f"{run.name}: " if sum(r.status is None for r in self._runs.values()) > 1 else ""
        if isinstance(event, events.StepStarted):
            s = run.step(event.step)
            s.status, s.attempt, s.retry_at = "running", event.attempt, None
            if s.started is None:
                s.started = event.at
            s.waited = max(s.waited, _waited(event))
            notes = [f"attempt {event.attempt}"] if event.attempt > 1 else []
            if format_waited(s.waited):
                notes.append(f"{format_waited(s.waited)} for a pool slot")
            again = f" ({', '.join(notes)})" if notes else ""
            self._line(event.at, f"{prefix}{s.name}: running{again}")
        elif isinstance(event, events.StepRetrying):
            s = run.step(event.step)
            s.status, s.error = "retrying", event.error
            s.retry_at = event.at if event.delay <= 0 else _after(event.at, event.delay)
            self._line(event.at, f"{prefix}{s.name}: attempt {event.attempt} failed "
                       f"({event.error}), retrying in {format_duration(event.delay)}")
        elif isinstance(event, events.StepFinished):
            s = run.step(event.step)
            s.status, s.ended, s.error, s.retry_at = event.status, event.at, event.error, None
            s.attempt = event.attempts or s.attempt
            s.waited = max(s.waited, _waited(event))
            waited = format_waited(s.waited)
            wait = f", {waited} for a pool slot" if waited else ""
            if event.status == "completed" and s.started is not None:
                tail = f" in {format_duration((event.at - s.started).total_seconds())}"
                if event.attempts > 1:
                    tail += f" after {event.attempts} attempts"
                tail += wait
            elif event.status == "failed":
                n = event.attempts
                tail = f" after {n} attempt{'s' if n != 1 else ''}{wait}" + (
                    f": {event.error}" if event.error else "")
            else:
                tail = wait
            self._line(event.at, f"{prefix}{s.name}: {event.status}{tail}")

    # -- plain lines -------------------------------------------------------------------

    def _line(self, at: datetime, text: str) -> None:
        if self._rich is not None:
            return
        try:
            self._stream.write(f"{_clock(at)} {text}\n")
            self._stream.flush()
        except (OSError, ValueError):  # a closed stream must not break a run
            pass

    # -- live table --------------------------------------------------------------------

    def _start_live(self) -> None:
        if self._rich is None:
            return
        with self._lock:
            if self._live is not None or not self._active:
                return
            live = self._live = self._rich.live.Live(
                console=self._console, get_renderable=self._render, auto_refresh=True,
                refresh_per_second=self._refresh, transient=False,
            )
        live.start(refresh=True)

    def _stop_live(self) -> None:
        with self._lock:
            live, self._live = self._live, None
        if live is not None:
            live.stop()  # draws the final state once more

    def _render(self) -> Any:
        rich = self._rich
        assert rich is not None
        with self._lock:
            runs = list(self._runs.values())
            now = datetime.now(UTC)
            height = self._console.size.height if self._console is not None else 40
            budget = max(6, (height - 4 * len(runs)) // max(len(runs), 1) - 3)
            tables = [self._run_table(rich, run, now, budget) for run in runs]
        return rich.console.Group(*tables)

    def _run_table(self, rich: Any, run: _RunState, now: datetime, budget: int) -> Any:
        status = run.status or "running"
        elapsed = ((run.ended or now) - run.started).total_seconds()
        heading = rich.text.Text.assemble(
            (run.name, "bold"), "  ", (status, status_style(status)),
            f"  {format_duration(elapsed)}", (f"  pipeline {run.pipeline}", "dim"))
        table = rich.table.Table(expand=False, show_edge=False, pad_edge=False, box=None,
                                 header_style="dim")
        table.add_column("", width=2)
        table.add_column("step", no_wrap=True, max_width=40, overflow="ellipsis")
        table.add_column("status", no_wrap=True)
        table.add_column("try", justify="right")
        table.add_column("time", justify="right", no_wrap=True)
        table.add_column("", overflow="ellipsis", no_wrap=True, max_width=60)
        steps = list(run.steps.values())
        hidden = 0
        if len(steps) > budget:
            # Too many rows for the screen: hide the oldest finished successful ones first.
            done = [s for s in steps if s.status in ("completed", "cached", "skipped")]
            done.sort(key=lambda s: s.ended or now)
            drop = {id(s) for s in done[: len(steps) - budget]}
            hidden = len(drop)
            steps = [s for s in steps if id(s) not in drop]
        for s in steps:
            style = status_style(s.status)
            icon: Any = rich.text.Text(status_icon(s.status), style=style)
            if s.status == "running":
                icon = rich.spinner.Spinner("dots", style=style)
            took = ""
            if s.started is not None and s.status != "cached":
                took = format_duration(((s.ended or now) - s.started).total_seconds())
            note = ""
            if s.status == "retrying" and s.retry_at is not None:
                left = max((s.retry_at - now).total_seconds(), 0.0)
                note = f"retry in {left:.1f}s · {s.error or ''}"
            elif s.status == "failed":
                note = s.error or ""
            elif format_waited(s.waited):
                note = f"{format_waited(s.waited)} for a pool slot"
            table.add_row(icon, s.name, rich.text.Text(s.status, style=style),
                          str(s.attempt) if s.attempt else "", took,
                          rich.text.Text(note, style="red" if s.status == "failed" else "dim"))
        if hidden:
            table.add_row("", rich.text.Text(f"… {hidden} finished steps not shown", "dim"),
                          "", "", "", "")
        return rich.console.Group(heading, table)


def _after(at: datetime, seconds: float) -> datetime:
    return at + timedelta(seconds=seconds)


_current: Progress | None = None


def progress(enabled: bool = True, *, stream: TextIO | None = None, live: bool | None = None,
             ) -> Progress:
    """Show the steps of every run in this process as they run.

    Call it once (`flowcore.progress()`) to keep it on, or use it as a context manager
    (`with flowcore.progress(): my_pipeline()`) to show only the runs inside the block.
    `flowcore.progress(False)` turns it off. Only one display is active: a new one replaces
    the last.

    Args:
        enabled: False turns the active display off.
        stream: where to draw (default: `sys.stderr`).
        live: True for the redrawn table (needs rich), False for plain lines; by default the
            table on a terminal and plain lines elsewhere.
    """
    global _current
    if _current is not None:
        _current.close()
    display = Progress(stream, live)
    if enabled:
        display.start()
        _current = display
    return display
