"""The PostgreSQL store's writes.

Status writes (a step run's row with its outputs, cache entry and logs; a run's status; a
heartbeat) are plain values, captured on the event loop when they are queued; however many
of them a group commit takes, they go to the server as ONE statement of arrays (`unnest`),
with one data-modifying CTE per table: one round trip, applied atomically. Writes with logic of
their own (creating a run, deleting one, clearing the cache, marking crashed runs) are async
functions of the connection, run in the batch's transaction in queue order.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flowcore._models import ArtifactVersion, PipelineRun, StepRun, StepStatus, encodable
from flowcore.exceptions import RunNameConflictError, RunNotFoundError
from flowcore.stores._sqlite_schema import encode_config, encode_hook_errors, encode_mapping

__all__ = [
    "DATA_TYPES", "Beats", "Call", "Data", "RunWrite", "StepWrite", "apply_data", "clear_cache",
    "delete_run", "insert_run", "mark_crashed", "replaces", "run_write", "step_write", "text",
    "utc",
]

Call = Callable[[Any], Awaitable[Any]]  # an async function of one asyncpg connection


def text(value: str | None) -> str | None:
    """Text PostgreSQL accepts: UTF-8 encodable (lone surrogates escaped, as SQLite stores
    them) and without NUL characters, which a `text` value cannot hold (written `\\x00`)."""
    if value is None:
        return None
    value = encodable(value)
    return value.replace("\x00", "\\x00") if "\x00" in value else value


def utc(value: datetime | None) -> datetime | None:
    """A timezone-aware time; naive means UTC (as SQLite's store reads it)."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


# -- status writes, as values ---------------------------------------------------------------


@dataclass(slots=True)
class StepWrite:
    """One step run's state, with what goes with it; `beat` is the run id to heartbeat."""

    step: tuple[Any, ...]
    artifacts: list[tuple[Any, ...]] = field(default_factory=list)
    outputs: list[tuple[Any, ...]] = field(default_factory=list)
    cache: tuple[Any, ...] | None = None
    logs: tuple[str, str] | None = None
    beat: str | None = None


@dataclass(slots=True)
class RunWrite:
    """A run's status and end time (`status` None: a heartbeat only)."""

    run_id: str
    status: str | None = None
    end_time: datetime | None = None
    finished: bool = False


@dataclass(slots=True)
class Beats:
    """Heartbeats of the runs this process has live (one write for all of them)."""

    run_ids: list[str]


Data = StepWrite | RunWrite | Beats
DATA_TYPES = (StepWrite, RunWrite, Beats)


def _content_hash(artifact: ArtifactVersion) -> str | None:
    try:
        return artifact.content_hash
    except RuntimeError:  # an artifact that cannot tell its hash; store it without one
        return None


def step_write(run: PipelineRun, sr: StepRun, *, beat: bool, with_config: bool = True
               ) -> StepWrite:
    """The state of `sr` now (the runner keeps changing the object after this returns).

    Without `with_config` (a row known to exist) the configuration is not encoded: a status
    write never changes it.
    """
    err = sr.error
    step = (
        sr.id, run.id, text(sr.name), text(sr.step_name), sr.status.value, sr.attempts,
        sr.cache_key, text(sr.cache_miss_reason), utc(sr.start_time), utc(sr.end_time),
        text(err.type) if err else None, text(err.message) if err else None,
        text(err.traceback) if err else None, text(encode_hook_errors(sr.hook_errors)),
        None if sr.cache_components is None else json.dumps(sr.cache_components, sort_keys=True),
        float(sr.waited), text(encode_config(sr.config)) if with_config else None,
        json.dumps(list(sr.upstream)),
    )
    write = StepWrite(step, beat=run.id if beat else None)
    for name, a in sr.outputs.items():
        write.artifacts.append((a.id, text(a.name), text(a.uri), a.materializer, a.data_type,
                                _content_hash(a), a.size, a.producer_step_run_id,
                                a.python_version))
        write.outputs.append((sr.id, text(name), a.id))
    if sr.status is StepStatus.COMPLETED and sr.cache_key is not None:
        write.cache = (sr.cache_key, sr.id, text(run.pipeline_name))
    if sr.status.is_finished and sr.logs:
        write.logs = (sr.id, text(sr.logs) or "")
    return write


_CONFIG = 16  # where a step row's config is


def newer_step(old: tuple[Any, ...], new: tuple[Any, ...]) -> tuple[Any, ...]:
    """`new`, keeping the config of `old` when `new` has none (the config is written with the
    row, and the row may not exist yet when two writes of a new step run go together)."""
    if new[_CONFIG] is None and old[_CONFIG] is not None:
        return (*new[:_CONFIG], old[_CONFIG], *new[_CONFIG + 1:])
    return new


def replaces(old: Any, new: StepWrite) -> StepWrite:
    """A queued step write taken over by a newer one of the same step run (see newer_step)."""
    if isinstance(old, StepWrite):
        new.step = newer_step(old.step, new.step)
    return new


def run_write(run: PipelineRun) -> RunWrite:
    return RunWrite(run.id, run.status.value, utc(run.end_time), run.status.is_finished)


_STEP_TYPES = ("text", "text", "text", "text", "text", "int4", "text", "text", "timestamptz",
               "timestamptz", "text", "text", "text", "text", "text", "float8", "text", "text")
_STEP_COLS = ("id", "run_id", "name", "step_name", "status", "attempts", "cache_key",
              "cache_miss_reason", "start_time", "end_time", "error_type", "error_message",
              "error_traceback", "hook_errors", "cache_components", "waited", "config", "upstream")
# Status writes leave the config, upstream and position alone (written once, with the row).
_STEP_UPDATED = _STEP_COLS[4:16]
_ART_TYPES = ("text",) * 6 + ("int8", "text", "text")


def _arrays(start: int, types: tuple[str, ...]) -> str:
    return ", ".join(f"${start + i}::{t}[]" for i, t in enumerate(types))


def _data_statement() -> str:
    n_step, n_art = len(_STEP_TYPES), len(_ART_TYPES)
    a0 = 1 + n_step
    o0 = a0 + n_art
    c0 = o0 + 3
    l0 = c0 + 3
    r0 = l0 + 2
    return f"""
WITH s AS (
  INSERT INTO step_runs ({", ".join(_STEP_COLS)}, position)
  -- A known row's status write carries no config (never updated); NOT NULL is checked
  -- before the conflict is, hence the placeholder.
  SELECT {", ".join("t." + c for c in _STEP_COLS[:16])}, COALESCE(t.config, '{{}}'), t.upstream,
    -- Not recorded by create_run (a fan-out element): it goes after the others.
    COALESCE((SELECT MAX(p.position) FROM step_runs p WHERE p.run_id = t.run_id), -1)
      + row_number() OVER (PARTITION BY t.run_id ORDER BY t.ord)
  FROM unnest({_arrays(1, _STEP_TYPES)}) WITH ORDINALITY AS t({", ".join(_STEP_COLS)}, ord)
  ON CONFLICT (id) DO UPDATE SET {", ".join(f"{c} = excluded.{c}" for c in _STEP_UPDATED)}
), a AS (
  INSERT INTO artifacts (id, name, uri, materializer, data_type, content_hash, size,
                         producer_step_run_id, python_version, created)
  SELECT t.*, now() FROM unnest({_arrays(a0, _ART_TYPES)}) AS t
  ON CONFLICT (id) DO NOTHING
), o AS (
  INSERT INTO step_outputs (step_run_id, output_name, artifact_id)
  SELECT * FROM unnest({_arrays(o0, ("text",) * 3)})
  ON CONFLICT (step_run_id, output_name) DO UPDATE SET artifact_id = excluded.artifact_id
), c AS (
  INSERT INTO cache_entries (cache_key, step_run_id, pipeline_name, created)
  SELECT t.*, now() FROM unnest({_arrays(c0, ("text",) * 3)}) AS t
  ON CONFLICT (cache_key) DO UPDATE SET step_run_id = excluded.step_run_id,
    pipeline_name = excluded.pipeline_name, created = excluded.created
), l AS (
  INSERT INTO step_logs (step_run_id, text) SELECT * FROM unnest({_arrays(l0, ("text",) * 2)})
  ON CONFLICT (step_run_id) DO UPDATE SET text = excluded.text
), r AS (
  -- Every write is a sign of life: the heartbeat is the database's clock.
  UPDATE runs SET heartbeat = now(),
    status = CASE WHEN t.status IS NULL THEN runs.status ELSE t.status END,
    end_time = CASE WHEN t.status IS NULL THEN runs.end_time ELSE t.end_time END
  FROM unnest({_arrays(r0, ("text", "text", "timestamptz"))}) AS t(id, status, end_time)
  WHERE runs.id = t.id
), x AS (
  -- A cancel request that arrived as the run ended has nobody to read it.
  DELETE FROM cancel_requests WHERE run_id = ANY(${r0 + 3}::text[])
)
SELECT 1"""


DATA_STATEMENT = _data_statement()


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


async def apply_data(conn: Any, writes: list[Data]) -> None:
    """Apply status writes in one statement. A row written twice keeps its last state (one
    statement may change a row only once); an artifact row is never rewritten."""
    steps: dict[str, tuple[Any, ...]] = {}
    artifacts: dict[str, tuple[Any, ...]] = {}
    outputs: dict[tuple[str, str], tuple[Any, ...]] = {}
    cache: dict[str, tuple[Any, ...]] = {}
    logs: dict[str, tuple[str, str]] = {}
    runs: dict[str, tuple[str, str | None, datetime | None]] = {}
    finished: list[str] = []
    for w in writes:
        if isinstance(w, Beats):
            for run_id in w.run_ids:
                runs.setdefault(run_id, (run_id, None, None))
            continue
        if isinstance(w, RunWrite):
            if w.status is not None or w.run_id not in runs:
                runs[w.run_id] = (w.run_id, w.status, w.end_time)
            if w.finished:
                finished.append(w.run_id)
            continue
        earlier = steps.pop(w.step[0], None)  # re-inserted last: the newest state, in order
        steps[w.step[0]] = w.step if earlier is None else newer_step(earlier, w.step)
        for a in w.artifacts:
            artifacts.setdefault(a[0], a)
        for o in w.outputs:
            outputs[(o[0], o[1])] = o
        if w.cache is not None:
            cache[w.cache[0]] = w.cache
        if w.logs is not None:
            logs[w.logs[0]] = w.logs
        if w.beat is not None and w.beat not in runs:
            runs[w.beat] = (w.beat, None, None)
    args = [*_columns(list(steps.values()), len(_STEP_TYPES)),
            *_columns(list(artifacts.values()), len(_ART_TYPES)),
            *_columns(list(outputs.values()), 3), *_columns(list(cache.values()), 3),
            *_columns(list(logs.values()), 2), *_columns(list(runs.values()), 3), finished]
    await conn.execute(DATA_STATEMENT, *args)


# -- writes with logic of their own ---------------------------------------------------------

_INSERT_RUN = f"""
WITH r AS (
  INSERT INTO runs (id, name, pipeline_name, status, start_time, end_time, parameters, unlisted,
                    resumed_from, source, pid, host, heartbeat)
  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, now())
  ON CONFLICT (name) DO NOTHING RETURNING id
), p AS (
  INSERT INTO pipelines (name, created) SELECT $3, now() WHERE EXISTS (SELECT 1 FROM r)
  ON CONFLICT (name) DO NOTHING
), s AS (
  INSERT INTO step_runs ({", ".join(_STEP_COLS)}, position)
  SELECT {", ".join("t." + c for c in _STEP_COLS)}, t.ord - 1
  FROM unnest({_arrays(13, _STEP_TYPES)}) WITH ORDINALITY AS t({", ".join(_STEP_COLS)}, ord)
  WHERE EXISTS (SELECT 1 FROM r)
)
SELECT count(*) FROM r"""


def insert_run(run: PipelineRun, *, pid: int, host: str) -> Call:
    """Insert a run and all its step runs in one statement; a used name raises
    RunNameConflictError (and inserts nothing)."""
    head = (run.id, text(run.name), text(run.pipeline_name), run.status.value,
            utc(run.start_time), utc(run.end_time), text(encode_mapping(run.parameters)),
            bool(run.unlisted), run.resumed_from, text(run.source), pid, text(host))
    steps = [step_write(run, sr, beat=False).step for sr in run.steps.values()]

    async def write(conn: Any) -> None:
        if await conn.fetchval(_INSERT_RUN, *head, *_columns(steps, len(_STEP_TYPES))):
            return
        taken = await conn.fetchval("SELECT pipeline_name FROM runs WHERE name = $1", head[1])
        raise RunNameConflictError(
            f"run name '{run.name}' is already used (by a run of pipeline '{taken}'); "
            f"pipeline '{run.pipeline_name}' needs another run_name, or a placeholder such "
            "as {time} or {run_id} in it"
        )

    return write


# A name wins over an id: names are what users type.
FIND_RUN = "SELECT id FROM runs WHERE name = $1 OR id = $1 ORDER BY (name = $1) DESC LIMIT 1"


def not_found(name_or_id: str) -> RunNotFoundError:
    return RunNotFoundError(f"no pipeline run named or with id '{name_or_id}'")


def delete_run(name_or_id: str) -> Call:
    """Delete a run; its step runs, outputs, logs and cache entries go with it (cascades)."""
    key = text(name_or_id)

    async def write(conn: Any) -> None:
        if await conn.fetchval(f"DELETE FROM runs WHERE id = ({FIND_RUN}) RETURNING id", key) is None:
            raise not_found(name_or_id)

    return write


def clear_cache(pipeline_name: str | None) -> Call:
    """Delete cache entries (of one pipeline, or all); the call returns how many."""

    async def write(conn: Any) -> int:
        if pipeline_name is None:
            status = await conn.execute("DELETE FROM cache_entries")
        else:
            status = await conn.execute("DELETE FROM cache_entries WHERE pipeline_name = $1",
                                        text(pipeline_name))
        return int(status.split()[-1])

    return write


# The crash itself, shared by mark_crashed and a cancel request for a dead run: the steps that
# were running stopped with its process, the ones that never started are skipped; the end
# time is the last sign of life.
CRASH_STEPS = """
  UPDATE step_runs s SET
    status = CASE WHEN s.status = 'pending' THEN 'skipped' ELSE 'stopped' END,
    end_time = COALESCE(s.end_time, d.end_time)
  FROM dead d WHERE s.run_id = d.id AND s.status IN ('pending', 'running', 'retrying')"""

_MARK_CRASHED = f"""
WITH dead AS (
  UPDATE runs SET status = 'crashed', end_time = COALESCE(heartbeat, start_time)
  WHERE status = 'running' AND (id = ANY($3::text[]) OR (NOT (id = ANY($2::text[]))
    AND COALESCE(heartbeat, start_time) < now() - make_interval(secs => $1)))
  RETURNING id, name, end_time
), steps AS ({CRASH_STEPS}
), orphans AS (
  -- Unfinished step rows of runs already finished (a process that died between its last
  -- step write and its run write): STOPPED, at the run's end, else now.
  UPDATE step_runs s SET status = 'stopped', end_time = COALESCE(s.end_time, r.end_time, now())
  FROM runs r WHERE r.id = s.run_id AND r.status != 'running'
    AND s.status IN ('pending', 'running', 'retrying')
  RETURNING 1
)
SELECT ARRAY(SELECT name FROM dead ORDER BY name), (SELECT count(*) FROM orphans)"""


def mark_crashed(stale_after: float, live_here: list[str], space: str,
                 pid_gone: Callable[[str, int | None, str | None], bool]) -> Call:
    """Mark CRASHED the RUNNING runs whose process is gone: those whose heartbeat is older
    than `stale_after` seconds by the database's clock (except `live_here`, run by this
    process), and those of this process space (`space`) whose pid is gone; stop the
    unfinished steps of finished runs. The call returns (crashed run names, steps stopped)."""

    async def write(conn: Any) -> tuple[list[str], int]:
        local = await conn.fetch("SELECT id, pid, host FROM runs WHERE status = 'running' "
                                 "AND host = $1", space)
        dead_here = [r["id"] for r in local if pid_gone(r["id"], r["pid"], r["host"])]
        row = await conn.fetchrow(_MARK_CRASHED, float(stale_after), live_here, dead_here)
        return list(row[0]), int(row[1])

    return write
