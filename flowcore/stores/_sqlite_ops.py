"""The metadata store's statements: synchronous functions of one sqlite3 connection.

They run in the store's connection thread. Writes run inside the transaction the caller
opened (one per group commit); reads open their own read transaction so that a run and its
step runs come from one snapshot.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from flowcore._models import (
    ArtifactVersion,
    ErrorInfo,
    PipelineRun,
    RunStatus,
    StepRun,
    StepStatus,
    encodable,
)
from flowcore.exceptions import ArtifactLoadError, RunNameConflictError, RunNotFoundError
from flowcore.stores._sqlite_schema import (
    decode_config,
    decode_hook_errors,
    encode_config,
    encode_hook_errors,
    encode_mapping,
    from_iso,
    to_iso,
)

T = TypeVar("T")

_STEP_COLUMNS = (
    "id, run_id, name, step_name, status, attempts, cache_key, cache_miss_reason, start_time, "
    "end_time, error_type, error_message, error_traceback, hook_errors, config, upstream"
)
_ARTIFACT_COLUMNS = (
    "id, name, uri, materializer, data_type, content_hash, size, producer_step_run_id, "
    "python_version"
)
_RUN_COLUMNS = "id, name, pipeline_name, status, start_time, end_time, parameters, unlisted"


# -- writes ---------------------------------------------------------------------------------
# Each builder reads the run objects when it is called (on the event loop, where the runner
# mutates them) and returns the operation that writes those values in the connection thread,
# so a write never sees a step run half-way through a change.

Write = Callable[[sqlite3.Connection], T]


def _row(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """The values with text UTF-8 cannot encode escaped (sqlite3 refuses lone surrogates).

    Called inside the writes, in the connection thread: a large text is never encoded on the loop.
    """
    return tuple(encodable(v) if type(v) is str else v for v in values)


def _step_values(sr: StepRun, *, with_config: bool = True) -> tuple[Any, ...]:
    err = sr.error
    values: tuple[Any, ...] = (
        sr.status.value, sr.attempts, sr.cache_key, sr.cache_miss_reason,
        to_iso(sr.start_time), to_iso(sr.end_time),
        err.type if err else None, err.message if err else None, err.traceback if err else None,
        encode_hook_errors(sr.hook_errors),
    )
    if with_config:
        values += (encode_config(sr.config), json.dumps(list(sr.upstream)))
    return values


def insert_run(run: PipelineRun, *, pid: int, host: str, now: datetime) -> Write[None]:
    """Insert a run and all its step runs; a used name raises RunNameConflictError."""
    run_row = (run.id, run.name, run.pipeline_name, run.status.value, to_iso(run.start_time),
               to_iso(run.end_time), encode_mapping(run.parameters), int(run.unlisted), pid, host,
               to_iso(now))
    step_rows = [(sr.id, run.id, sr.name, sr.step_name, *_step_values(sr), position)
                 for position, sr in enumerate(run.steps.values())]

    def write(db: sqlite3.Connection) -> None:
        try:
            db.execute(f"INSERT INTO runs ({_RUN_COLUMNS}, pid, host, heartbeat) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _row(run_row))
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
        db.executemany(f"INSERT INTO step_runs ({_STEP_COLUMNS}, position) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [_row(r) for r in step_rows])

    return write


def update_run(run: PipelineRun, now: datetime) -> Write[None]:
    """Store a run's status and end time; every write is also a sign of life."""
    row = (run.status.value, to_iso(run.end_time), to_iso(now), run.id)

    def write(db: sqlite3.Connection) -> None:
        db.execute("UPDATE runs SET status = ?, end_time = ?, heartbeat = ? WHERE id = ?", row)

    return write


def heartbeat(run_id: str, now: datetime) -> Write[None]:
    """Record that the run's process is alive."""
    row = (to_iso(now), run_id)

    def write(db: sqlite3.Connection) -> None:
        db.execute("UPDATE runs SET heartbeat = ? WHERE id = ?", row)

    return write


# The config is written once, with the row; status writes leave it alone.
_UPDATE_STEP = (
    "UPDATE step_runs SET status = ?, attempts = ?, cache_key = ?, cache_miss_reason = ?, "
    "start_time = ?, end_time = ?, error_type = ?, error_message = ?, error_traceback = ?, "
    "hook_errors = ? WHERE id = ?"
)
_INSERT_STEP = (
    f"INSERT INTO step_runs ({_STEP_COLUMNS}, position) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    "(SELECT COALESCE(MAX(position), -1) + 1 FROM step_runs WHERE run_id = ?))"
)


def upsert_step_run(
    run: PipelineRun, sr: StepRun, now: datetime, *, beat: bool = True,
) -> Write[None]:
    """Insert or update a step run with its outputs and, once completed, its cache entry."""
    values = _step_values(sr, with_config=False)
    update_row = (*values, sr.id)
    config = sr.config

    def insert_row() -> tuple[Any, ...]:
        return (sr.id, run.id, sr.name, sr.step_name, *values, encode_config(config),
                json.dumps(list(sr.upstream)), run.id)
    artifacts = list(sr.outputs.values())
    output_rows = [(sr.id, name, a.id) for name, a in sr.outputs.items()]
    cache_row = None
    if sr.status is StepStatus.COMPLETED and sr.cache_key is not None:
        cache_row = (sr.cache_key, sr.id, run.pipeline_name, to_iso(now))
    beat_write = heartbeat(run.id, now) if beat else None
    logs = sr.logs if sr.status.is_finished else None

    def write(db: sqlite3.Connection) -> None:
        if db.execute(_UPDATE_STEP, _row(update_row)).rowcount == 0:
            # Not recorded by create_run (a fan-out element): it goes after the others.
            db.execute(_INSERT_STEP, _row(insert_row()))
        if artifacts:
            db.executemany(
                f"INSERT OR IGNORE INTO artifacts ({_ARTIFACT_COLUMNS}, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                # The hash is read here, off the loop: an in-memory artifact computes it.
                [_row((a.id, a.name, a.uri, a.materializer, a.data_type, _content_hash(a), a.size,
                       a.producer_step_run_id, a.python_version, to_iso(now))) for a in artifacts],
            )
            db.executemany(
                "INSERT INTO step_outputs (step_run_id, output_name, artifact_id) "
                "VALUES (?, ?, ?) ON CONFLICT(step_run_id, output_name) "
                "DO UPDATE SET artifact_id = excluded.artifact_id",
                [_row(r) for r in output_rows],
            )
        if cache_row is not None:
            db.execute(
                "INSERT INTO cache_entries (cache_key, step_run_id, pipeline_name, created) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(cache_key) DO UPDATE SET "
                "step_run_id = excluded.step_run_id, pipeline_name = excluded.pipeline_name, "
                "created = excluded.created",
                _row(cache_row),
            )
        if logs:
            db.execute("INSERT OR REPLACE INTO step_logs (step_run_id, text) VALUES (?, ?)",
                       (sr.id, encodable(logs)))
        if beat_write is not None:
            beat_write(db)

    return write


def _content_hash(artifact: ArtifactVersion) -> str | None:
    try:
        return artifact.content_hash
    except RuntimeError:  # an artifact that cannot tell its hash; store it without one
        return None


def delete_run(db: sqlite3.Connection, name_or_id: str) -> None:
    """Delete a run; its step runs, outputs and cache entries go with it (foreign keys)."""
    row = _find_run_row(db, name_or_id)
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
        if dead:
            db.execute(
                "UPDATE runs SET status = ?, end_time = ? WHERE id = ? AND status = 'running'",
                (RunStatus.CRASHED.value, to_iso(last), row["id"]),
            )
            # Its steps no longer run: the ones that were running stopped with the process,
            # the ones that never started are skipped.
            db.execute(
                "UPDATE step_runs SET status = ?, end_time = COALESCE(end_time, ?) "
                "WHERE run_id = ? AND status IN ('running', 'retrying')",
                (StepStatus.STOPPED.value, to_iso(last), row["id"]),
            )
            db.execute(
                "UPDATE step_runs SET status = ?, end_time = COALESCE(end_time, ?) "
                "WHERE run_id = ? AND status = 'pending'",
                (StepStatus.SKIPPED.value, to_iso(last), row["id"]),
            )
            crashed.append(str(row["name"]))
    return crashed


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


# -- reads ----------------------------------------------------------------------------------


def read_snapshot(db: sqlite3.Connection, read: Callable[[sqlite3.Connection], T]) -> T:
    """Run several SELECTs in one read transaction, so they see one state of the database."""
    db.execute("BEGIN")
    try:
        return read(db)
    finally:
        db.execute("COMMIT")


def _artifact_from_row(row: sqlite3.Row) -> ArtifactVersion:
    return ArtifactVersion(
        id=row["id"], name=row["name"], uri=row["uri"], materializer=row["materializer"],
        data_type=row["data_type"], content_hash=row["content_hash"], size=row["size"],
        producer_step_run_id=row["producer_step_run_id"], python_version=row["python_version"],
    )


def _step_from_row(row: sqlite3.Row) -> StepRun:
    sr = StepRun(id=row["id"], name=row["name"], step_name=row["step_name"],
                 pipeline_run_id=row["run_id"], config=decode_config(row["config"]),
                 status=StepStatus(row["status"]))
    sr.attempts = row["attempts"]
    sr.cache_key = row["cache_key"]
    sr.cache_miss_reason = row["cache_miss_reason"]
    sr.start_time = from_iso(row["start_time"])
    sr.end_time = from_iso(row["end_time"])
    if row["error_type"] is not None:
        sr.error = ErrorInfo(type=row["error_type"], message=row["error_message"] or "",
                             traceback=row["error_traceback"] or "")
    sr.hook_errors = decode_hook_errors(row["hook_errors"])
    sr.upstream = tuple(json.loads(row["upstream"] or "[]"))
    return sr


def _run_from_row(row: sqlite3.Row) -> PipelineRun:
    run = PipelineRun(id=row["id"], name=row["name"], pipeline_name=row["pipeline_name"],
                      start_time=datetime.fromisoformat(row["start_time"]),
                      status=RunStatus(row["status"]),
                      parameters=json.loads(row["parameters"]), unlisted=bool(row["unlisted"]))
    run.end_time = from_iso(row["end_time"])
    return run


def _attach_outputs(db: sqlite3.Connection, steps: dict[str, StepRun], step_filter: str,
                    params: Iterable[Any]) -> None:
    rows = db.execute(
        f"SELECT o.step_run_id AS step_run_id, o.output_name AS output_name, "
        f"{', '.join('a.' + c.strip() for c in _ARTIFACT_COLUMNS.split(','))} "
        "FROM step_outputs o JOIN artifacts a ON a.id = o.artifact_id "
        f"WHERE o.step_run_id IN ({step_filter}) ORDER BY o.rowid",
        tuple(params),
    ).fetchall()
    for row in rows:
        sr = steps.get(row["step_run_id"])
        if sr is not None:
            sr.outputs[row["output_name"]] = _artifact_from_row(row)


def _runs_with_steps(db: sqlite3.Connection, run_filter: str, params: tuple[Any, ...]
                     ) -> list[PipelineRun]:
    runs = [_run_from_row(r) for r in db.execute(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE id IN ({run_filter}) "
        "ORDER BY start_time DESC, rowid DESC", params).fetchall()]
    by_id = {run.id: run for run in runs}
    steps: dict[str, StepRun] = {}
    for row in db.execute(
        f"SELECT {_STEP_COLUMNS} FROM step_runs WHERE run_id IN ({run_filter}) "
        "ORDER BY run_id, position", params,
    ).fetchall():
        sr = _step_from_row(row)
        by_id[sr.pipeline_run_id].steps[sr.name] = sr
        steps[sr.id] = sr
    _attach_outputs(db, steps, f"SELECT id FROM step_runs WHERE run_id IN ({run_filter})", params)
    return runs


def _find_run_row(db: sqlite3.Connection, name_or_id: str) -> sqlite3.Row:
    # A name wins over an id: names are what users type.
    row: sqlite3.Row | None = db.execute(
        "SELECT id FROM runs WHERE name = ? OR id = ? ORDER BY name = ? DESC LIMIT 1",
        (encodable(name_or_id),) * 3,
    ).fetchone()
    if row is None:
        raise RunNotFoundError(f"no pipeline run named or with id '{name_or_id}'")
    return row


def read_run(db: sqlite3.Connection, name_or_id: str) -> PipelineRun:
    """The run with that name (or else id), with its step runs and their outputs."""
    run_id = _find_run_row(db, name_or_id)["id"]
    return _runs_with_steps(db, "?", (run_id,))[0]


def list_runs(db: sqlite3.Connection, pipeline_name: str | None, status: RunStatus | None,
              limit: int) -> list[PipelineRun]:
    """Listed runs, newest first, with their step runs."""
    where = ["unlisted = 0"]
    params: list[Any] = []
    if pipeline_name is not None:
        where.append("pipeline_name = ?")
        params.append(encodable(pipeline_name))
    if status is not None:
        where.append("status = ?")
        params.append(status.value)
    run_filter = (f"SELECT id FROM runs WHERE {' AND '.join(where)} "
                  "ORDER BY start_time DESC, rowid DESC LIMIT ?")
    return _runs_with_steps(db, run_filter, (*params, limit))


def read_artifact(db: sqlite3.Connection, artifact_id: str) -> ArtifactVersion:
    """One artifact row; an unknown id raises ArtifactLoadError."""
    row = db.execute(f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE id = ?",
                     (artifact_id,)).fetchone()
    if row is None:
        raise ArtifactLoadError(f"no artifact version with id '{artifact_id}'")
    return _artifact_from_row(row)


def read_step_logs(db: sqlite3.Connection, step_run_id: str) -> str:
    """What one step run printed and logged ('' if nothing)."""
    row = db.execute("SELECT text FROM step_logs WHERE step_run_id = ?",
                     (step_run_id,)).fetchone()
    return str(row["text"]) if row is not None else ""


def find_cached_many(db: sqlite3.Connection, cache_keys: list[str]) -> dict[str, StepRun]:
    """The COMPLETED step runs indexed under each of `cache_keys` (missing keys are absent)."""
    found: dict[str, StepRun] = {}
    columns = ", ".join("s." + c.strip() for c in _STEP_COLUMNS.split(","))
    for start in range(0, len(cache_keys), 500):  # SQLite's bound-parameter limit
        chunk = cache_keys[start:start + 500]
        marks = ", ".join("?" * len(chunk))
        rows = db.execute(
            f"SELECT c.cache_key AS cache_key_found, {columns} "
            "FROM cache_entries c JOIN step_runs s ON s.id = c.step_run_id "
            f"WHERE c.cache_key IN ({marks}) AND s.status = ?",
            (*chunk, StepStatus.COMPLETED.value),
        ).fetchall()
        steps = {}
        for row in rows:
            sr = _step_from_row(row)
            found[row["cache_key_found"]] = sr
            steps[sr.id] = sr
        if steps:
            _attach_outputs(db, steps, ", ".join("?" * len(steps)), steps)
    return found


def find_cached(db: sqlite3.Connection, cache_key: str) -> StepRun | None:
    """The COMPLETED step run indexed under `cache_key`, with its outputs, or None."""
    row = db.execute(
        f"SELECT {', '.join('s.' + c.strip() for c in _STEP_COLUMNS.split(','))} "
        "FROM cache_entries c JOIN step_runs s ON s.id = c.step_run_id "
        "WHERE c.cache_key = ? AND s.status = ?",
        (cache_key, StepStatus.COMPLETED.value),
    ).fetchone()
    if row is None:
        return None
    sr = _step_from_row(row)
    _attach_outputs(db, {sr.id: sr}, "?", (sr.id,))
    return sr
