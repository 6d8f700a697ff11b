"""The metadata store's writes: synchronous functions of one sqlite3 connection.

They run in the store's connection thread, inside the transaction the caller opened (one per
group commit). The reads are in `_sqlite_reads`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from flowcore._models import PipelineRun, RunStatus, StepRun, StepStatus, encodable
from flowcore.exceptions import RunNameConflictError
from flowcore.stores._sqlite_reads import RUN_COLUMNS, STEP_COLUMNS, find_run_row
from flowcore.stores._sqlite_schema import (
    encode_config,
    encode_hook_errors,
    encode_mapping,
    from_iso,
    to_iso,
)

T = TypeVar("T")


# -- writes ---------------------------------------------------------------------------------
# Each builder reads the run objects when it is called (on the event loop, where the runner
# mutates them) and returns the operation that writes those values in the connection thread,
# so a write never sees a step run half-way through a change.

Write = Callable[[sqlite3.Connection], T]


def _row(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """The values with text UTF-8 cannot encode escaped (sqlite3 refuses lone surrogates).

    Called inside the writes, in the connection thread: a large text is never encoded on the loop.
    """
    return tuple(encodable(v) if type(v) is str else _json(v) if type(v) is dict else v
                 for v in values)


def _json(value: dict[str, Any]) -> str:
    """A step run's cache key components (a dict of strings), encoded in the writing thread."""
    return encodable(json.dumps(value, sort_keys=True))


def _step_values(sr: StepRun, *, with_config: bool = True) -> tuple[Any, ...]:
    err = sr.error
    values: tuple[Any, ...] = (
        sr.status.value, sr.attempts, sr.cache_key, sr.cache_miss_reason,
        to_iso(sr.start_time), to_iso(sr.end_time),
        err.type if err else None, err.message if err else None, err.traceback if err else None,
        encode_hook_errors(sr.hook_errors), sr.cache_components, float(sr.waited),
    )
    if with_config:
        values += (encode_config(sr.config), json.dumps(list(sr.upstream)))
    return values


def insert_run(run: PipelineRun, *, pid: int, host: str, now: datetime) -> Write[None]:
    """Insert a run (not its step runs: see insert_step_rows); a used name raises
    RunNameConflictError."""
    run_row = (run.id, run.name, run.pipeline_name, run.status.value, to_iso(run.start_time),
               to_iso(run.end_time), encode_mapping(run.parameters), int(run.unlisted),
               run.resumed_from, run.source, pid, host, to_iso(now))

    def write(db: sqlite3.Connection) -> None:
        try:
            db.execute(f"INSERT INTO runs ({RUN_COLUMNS}, pid, host, heartbeat) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _row(run_row))
        except sqlite3.IntegrityError:
            taken = db.execute("SELECT pipeline_name FROM runs WHERE name = ?",
                               (encodable(run.name),)).fetchone()
            if taken is None:
                raise
            raise RunNameConflictError(
                f"run name '{run.name}' is already used (by a run of pipeline '{taken[0]}'); "
                f"pipeline '{run.pipeline_name}' needs another run_name, or a placeholder such "
                "as {time} or {run_id} in it"
            ) from None
        db.execute("INSERT OR IGNORE INTO pipelines (name, created) VALUES (?, ?)",
                   _row((run.pipeline_name, to_iso(now))))

    return write


def insert_step_rows(run: PipelineRun) -> Write[None] | None:
    """Insert the step runs a run has now (its plan), in order; None if it has none.

    The rows are made now, on the event loop, from the step runs as they are."""
    if not run.steps:
        return None
    step_rows = [(sr.id, run.id, sr.name, sr.step_name, *_step_values(sr), position)
                 for position, sr in enumerate(run.steps.values())]

    def write(db: sqlite3.Connection) -> None:
        db.executemany(f"INSERT INTO step_runs ({STEP_COLUMNS}, position) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [_row(r) for r in step_rows])

    return write


def update_run(run: PipelineRun, now: datetime) -> Write[None]:
    """Store a run's status and end time; every write is also a sign of life."""
    row = (run.status.value, to_iso(run.end_time), to_iso(now), run.id)

    finished = run.status.is_finished

    def write(db: sqlite3.Connection) -> None:
        db.execute("UPDATE runs SET status = ?, end_time = ?, heartbeat = ? WHERE id = ?", row)
        if finished:  # a cancel request that arrived as the run ended has nobody to read it
            db.execute("DELETE FROM cancel_requests WHERE run_id = ?", (row[-1],))

    return write


def heartbeats(run_ids: list[str], now: datetime) -> Write[None]:
    """Record that these runs' process is alive (one statement for all of them)."""
    rows = [(to_iso(now), run_id) for run_id in run_ids]

    def write(db: sqlite3.Connection) -> None:
        db.executemany("UPDATE runs SET heartbeat = ? WHERE id = ?", rows)

    return write


def heartbeat(run_id: str, now: datetime) -> Write[None]:
    """Record that the run's process is alive."""
    row = (to_iso(now), run_id)

    def write(db: sqlite3.Connection) -> None:
        db.execute("UPDATE runs SET heartbeat = ? WHERE id = ?", row)

    return write


def delete_run(db: sqlite3.Connection, name_or_id: str) -> None:
    """Delete a run; its step runs, outputs and cache entries go with it (foreign keys)."""
    row = find_run_row(db, name_or_id)
    db.execute("DELETE FROM runs WHERE id = ?", (row["id"],))


def clear_cache(db: sqlite3.Connection, pipeline_name: str | None) -> int:
    """Delete cache entries (of one pipeline, or all); return how many."""
    if pipeline_name is None:
        return db.execute("DELETE FROM cache_entries").rowcount
    return db.execute(
        "DELETE FROM cache_entries WHERE pipeline_name = ?", (encodable(pipeline_name),)
    ).rowcount


def mark_crashed(
    db: sqlite3.Connection,
    *,
    host: str,
    now: datetime,
    stale_after: timedelta,
    is_dead: Callable[[int | None, str], bool],
) -> list[str]:
    """Mark RUNNING runs whose process is gone as CRASHED; return their names.

    On this host `is_dead(pid, run_id)` decides; a run of another host is dead when its
    heartbeat is older than `stale_after`. The end time is the last sign of life.
    """
    crashed = []
    rows = db.execute(
        "SELECT id, name, pid, host, heartbeat, start_time FROM runs WHERE status = 'running'"
    ).fetchall()
    for row in rows:
        last = from_iso(row["heartbeat"] or row["start_time"])
        if row["host"] == host:
            dead = is_dead(row["pid"], row["id"])
        else:
            dead = last is None or now - last > stale_after
        if dead and crash_run(db, row["id"], last):
            crashed.append(str(row["name"]))
    return crashed


def crash_run(db: sqlite3.Connection, run_id: str, last: datetime | None) -> bool:
    """Mark one RUNNING run CRASHED at `last` (its last sign of life): the steps that were
    running stopped with its process, the ones that never started are skipped. Returns
    whether the run was still RUNNING."""
    if db.execute(
        "UPDATE runs SET status = ?, end_time = ? WHERE id = ? AND status = 'running'",
        (RunStatus.CRASHED.value, to_iso(last), run_id),
    ).rowcount == 0:
        return False
    db.execute(
        "UPDATE step_runs SET status = ?, end_time = COALESCE(end_time, ?) "
        "WHERE run_id = ? AND status IN ('running', 'retrying')",
        (StepStatus.STOPPED.value, to_iso(last), run_id),
    )
    db.execute(
        "UPDATE step_runs SET status = ?, end_time = COALESCE(end_time, ?) "
        "WHERE run_id = ? AND status = 'pending'",
        (StepStatus.SKIPPED.value, to_iso(last), run_id),
    )
    return True


# The same list as the partial index step_runs_unfinished (schema version 3), word for word:
# SQLite uses a partial index only when the query repeats its condition.
_UNFINISHED = "status IN ('pending', 'running', 'retrying')"


def stop_orphaned_steps(db: sqlite3.Connection, *, now: datetime) -> int:
    """Mark STOPPED the PENDING, RUNNING or RETRYING step rows of runs that are already
    finished (no process runs them any more); return how many.

    Their end time is the run's, else now. The partial index keeps this cheap on every open:
    it holds only the steps that are not finished, whatever the size of the history.
    """
    return db.execute(
        "UPDATE step_runs SET status = ?, end_time = COALESCE(end_time, "
        "(SELECT r.end_time FROM runs r WHERE r.id = step_runs.run_id), ?) "
        # EXISTS, not `run_id IN (finished runs)`: the plan walks the small index and looks
        # each run up by key, instead of listing every finished run in the history.
        f"WHERE {_UNFINISHED} AND EXISTS (SELECT 1 FROM runs r WHERE r.id = step_runs.run_id "
        "AND r.status != 'running')",
        (StepStatus.STOPPED.value, to_iso(now)),
    ).rowcount
