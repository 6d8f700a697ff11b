"""The metadata store's reads: synchronous functions of one sqlite3 connection, run in the
store's connection thread. `read_snapshot` wraps several SELECTs in one read transaction, so a
run and its step runs come from one state of the database."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from datetime import datetime
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
from flowcore.exceptions import ArtifactLoadError, RunNotFoundError
from flowcore.stores._sqlite_schema import decode_config, decode_hook_errors, from_iso

__all__ = [
    "ARTIFACT_COLUMNS", "RUN_COLUMNS", "STEP_COLUMNS", "find_cached_many",
    "find_latest_cache_components_many", "find_run_row",
    "list_runs", "read_artifact", "read_run", "read_snapshot", "read_step_logs",
]

T = TypeVar("T")

STEP_COLUMNS = (
    "id, run_id, name, step_name, status, attempts, cache_key, cache_miss_reason, start_time, "
    "end_time, error_type, error_message, error_traceback, hook_errors, cache_components, waited, "
    "config, upstream"
)
ARTIFACT_COLUMNS = (
    "id, name, uri, materializer, data_type, content_hash, size, producer_step_run_id, "
    "python_version, content"
)
RUN_COLUMNS = ("id, name, pipeline_name, status, start_time, end_time, parameters, unlisted, "
               "resumed_from, source")



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
        value=row["content"],  # an inline artifact's bytes (bound by the store), else None
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
    if row["cache_components"] is not None:
        sr.cache_components = json.loads(row["cache_components"])
    sr.waited = row["waited"] or 0.0
    return sr


def _run_from_row(row: sqlite3.Row) -> PipelineRun:
    run = PipelineRun(id=row["id"], name=row["name"], pipeline_name=row["pipeline_name"],
                      start_time=datetime.fromisoformat(row["start_time"]),
                      status=RunStatus(row["status"]),
                      parameters=json.loads(row["parameters"]), unlisted=bool(row["unlisted"]))
    run.end_time = from_iso(row["end_time"])
    run.resumed_from = row["resumed_from"]
    run.source = row["source"]
    return run


def _attach_outputs(db: sqlite3.Connection, steps: dict[str, StepRun], step_filter: str,
                    params: Iterable[Any]) -> None:
    rows = db.execute(
        f"SELECT o.step_run_id AS step_run_id, o.output_name AS output_name, "
        f"{', '.join('a.' + c.strip() for c in ARTIFACT_COLUMNS.split(','))} "
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
        f"SELECT {RUN_COLUMNS} FROM runs WHERE id IN ({run_filter}) "
        "ORDER BY start_time DESC, rowid DESC", params).fetchall()]
    by_id = {run.id: run for run in runs}
    steps: dict[str, StepRun] = {}
    for row in db.execute(
        f"SELECT {STEP_COLUMNS} FROM step_runs WHERE run_id IN ({run_filter}) "
        "ORDER BY run_id, position", params,
    ).fetchall():
        sr = _step_from_row(row)
        by_id[sr.pipeline_run_id].steps[sr.name] = sr
        steps[sr.id] = sr
    _attach_outputs(db, steps, f"SELECT id FROM step_runs WHERE run_id IN ({run_filter})", params)
    return runs


def find_run_row(db: sqlite3.Connection, name_or_id: str) -> sqlite3.Row:
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
    run_id = find_run_row(db, name_or_id)["id"]
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
    row = db.execute(f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE id = ?",
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
    columns = ", ".join("s." + c.strip() for c in STEP_COLUMNS.split(","))
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


def find_latest_cache_components_many(db: sqlite3.Connection, items: list[tuple[str, str]]
                                      ) -> list[dict[str, str] | None]:
    """For each (run id, invocation ID): the cache key components of the newest step run of
    that name, in another run of the same pipeline, that has them (None if none).

    Walks that pipeline's runs newest first (runs_pipeline index) and probes each run's step
    by name (step_runs_name index)."""
    out: list[dict[str, str] | None] = []
    for run_id, name in items:
        row = db.execute(
            "SELECT s.cache_components FROM runs r "
            "JOIN step_runs s ON s.run_id = r.id AND s.name = ? "
            "WHERE r.pipeline_name = (SELECT pipeline_name FROM runs WHERE id = ?) "
            "AND r.id != ? AND s.cache_components IS NOT NULL "
            "ORDER BY r.start_time DESC, r.rowid DESC LIMIT 1",
            (encodable(name), run_id, run_id),
        ).fetchone()
        out.append(None if row is None else json.loads(row[0]))
    return out
