"""A step run's write: its row, outputs, cache entry and logs, snapshotted on the event loop
and turned into rows in the connection's thread.

A group commit applies the step writes that follow one another in its batch together, one
`executemany` per table: most of a step's cost in the writer thread was Python calling
`execute` once per table per step (1,000-step runs: 1,000 x 3 statements). Grouping changes
no outcome: the batch is one transaction, the rows of each table go in queue order, and the
tables go in the order their foreign keys need (step rows, artifacts, outputs, cache entries,
logs). If anything in a group fails, the whole batch is replayed one write at a time (see
`_sqlite_commit`), each write applying itself alone (`StepWrite.__call__`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from flowcore._models import ArtifactVersion, PipelineRun, StepRun, StepStatus, encodable
from flowcore.stores._sqlite_inline import payload_of
from flowcore.stores._sqlite_reads import ARTIFACT_COLUMNS, STEP_COLUMNS
from flowcore.stores._sqlite_schema import encode_config, encode_hook_errors, to_iso

__all__ = ["StepWrite", "apply_step_writes"]

# The config and upstream are written once, with the row; status writes leave them alone.
_UPDATE_STEP = (
    "UPDATE step_runs SET status = ?, attempts = ?, cache_key = ?, cache_miss_reason = ?, "
    "start_time = ?, end_time = ?, error_type = ?, error_message = ?, error_traceback = ?, "
    "hook_errors = ?, cache_components = ?, waited = ? WHERE id = ?"
)
_INSERT_STEP = (
    f"INSERT INTO step_runs ({STEP_COLUMNS}, position) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    "(SELECT COALESCE(MAX(position), -1) + 1 FROM step_runs WHERE run_id = ?))"
)
_INSERT_ARTIFACT = (
    f"INSERT OR IGNORE INTO artifacts ({ARTIFACT_COLUMNS}, created) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_OUTPUT = (
    "INSERT INTO step_outputs (step_run_id, output_name, artifact_id) VALUES (?, ?, ?) "
    "ON CONFLICT(step_run_id, output_name) DO UPDATE SET artifact_id = excluded.artifact_id"
)
_UPSERT_CACHE = (
    "INSERT INTO cache_entries (cache_key, step_run_id, pipeline_name, created) "
    "VALUES (?, ?, ?, ?) ON CONFLICT(cache_key) DO UPDATE SET "
    "step_run_id = excluded.step_run_id, pipeline_name = excluded.pipeline_name, "
    "created = excluded.created"
)
_UPSERT_LOGS = "INSERT OR REPLACE INTO step_logs (step_run_id, text) VALUES (?, ?)"
_BEAT = "UPDATE runs SET heartbeat = ? WHERE id = ?"


def _text(value: str | None) -> str | None:
    """Stored text must encode (sqlite3 refuses lone surrogates): escape what does not."""
    return value if value is None or value.isascii() else encodable(value)


class StepWrite:
    """The state of one step run at the moment it was recorded, as a write.

    The constructor runs on the event loop, where the runner mutates the step run: it copies
    the fields a row needs (all immutable values) and nothing more, so a write that a newer
    one replaces before any commit took it (see WriteQueue.record) costs almost nothing. The
    rows themselves (timestamps as text, JSON) are made in the connection's thread.
    """

    __slots__ = ("_artifacts", "_beat", "_cache", "_logs", "_now", "_run", "_sr", "_state")

    def __init__(self, run: PipelineRun, sr: StepRun, now: datetime, *, beat: bool) -> None:
        self._run = run  # the row's identity (ids, names, config, upstream) never changes
        self._sr = sr
        self._now = now
        self._beat = beat
        self._state = (sr.status.value, sr.attempts, sr.cache_key, sr.cache_miss_reason,
                       sr.start_time, sr.end_time, sr.error,
                       tuple(sr.hook_errors) if sr.hook_errors else (),
                       sr.cache_components, float(sr.waited))
        self._artifacts = list(sr.outputs.items()) if sr.outputs else []
        self._cache = (sr.cache_key if sr.status is StepStatus.COMPLETED
                       and sr.cache_key is not None else None)
        self._logs = sr.logs if sr.status.is_finished else None

    # -- rows (connection thread) ----------------------------------------------------------

    def _values(self) -> tuple[Any, ...]:
        (status, attempts, cache_key, miss, start, end, err, hooks, components,
         waited) = self._state
        return (
            status, attempts, cache_key, _text(miss), to_iso(start), to_iso(end),
            _text(err.type) if err else None, _text(err.message) if err else None,
            _text(err.traceback) if err else None,
            encode_hook_errors(list(hooks)) if hooks else "[]",
            None if components is None else encodable(json.dumps(components, sort_keys=True)),
            waited,
        )

    def _insert_row(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        sr, run = self._sr, self._run
        return (sr.id, run.id, _text(sr.name), _text(sr.step_name), *values,
                encode_config(sr.config), json.dumps(list(sr.upstream)), run.id)

    def _artifact_rows(self) -> list[tuple[Any, ...]]:
        created = to_iso(self._now)
        return [(a.id, _text(a.name), _text(a.uri), _text(a.materializer), _text(a.data_type),
                 _content_hash(a), a.size, a.producer_step_run_id, a.python_version,
                 payload_of(a), created)
                for _, a in self._artifacts]

    def _output_rows(self) -> list[tuple[Any, ...]]:
        sr_id = self._sr.id
        return [(sr_id, _text(name), a.id) for name, a in self._artifacts]

    # -- one write alone -------------------------------------------------------------------

    def __call__(self, db: sqlite3.Connection) -> None:
        apply_step_writes(db, [self])


def apply_step_writes(db: sqlite3.Connection, writes: list[StepWrite]) -> None:
    """Apply step writes, in order, one statement per table for all of them."""
    values = [w._values() for w in writes]
    updated = db.executemany(
        _UPDATE_STEP, [(*v, w._sr.id) for w, v in zip(writes, values, strict=True)]).rowcount
    if updated != len(writes):
        # Some rows are not there yet (fan-out elements are not recorded by create_run; they
        # go after the others): apply these writes one by one, in order.
        for w, v in zip(writes, values, strict=True):
            if db.execute(_UPDATE_STEP, (*v, w._sr.id)).rowcount == 0:
                db.execute(_INSERT_STEP, w._insert_row(v))
    with_outputs = [w for w in writes if w._artifacts]
    if with_outputs:
        db.executemany(_INSERT_ARTIFACT, _chain(w._artifact_rows() for w in with_outputs))
        db.executemany(_UPSERT_OUTPUT, _chain(w._output_rows() for w in with_outputs))
    cache_rows = [(w._cache, w._sr.id, _text(w._run.pipeline_name), to_iso(w._now))
                  for w in writes if w._cache is not None]
    if cache_rows:
        db.executemany(_UPSERT_CACHE, cache_rows)
    logs = [(w._sr.id, encodable(w._logs)) for w in writes if w._logs]
    if logs:
        db.executemany(_UPSERT_LOGS, logs)
    beats = [(to_iso(w._now), w._run.id) for w in writes if w._beat]
    if beats:
        db.executemany(_BEAT, beats)


def _chain(rows: Iterable[list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
    return [row for part in rows for row in part]


def _content_hash(artifact: ArtifactVersion) -> str | None:
    try:
        return artifact.content_hash
    except RuntimeError:  # an artifact that cannot tell its hash; store it without one
        return None
