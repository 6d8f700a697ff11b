"""The PostgreSQL store's reads: async functions of one asyncpg connection. A read of a run
with its step runs and outputs runs in one read-only REPEATABLE READ transaction, so it sees
one state of the database (SQLite's `read_snapshot`)."""

from __future__ import annotations

import json
from typing import Any

from flowcore._models import ArtifactVersion, ErrorInfo, PipelineRun, RunStatus, StepRun, StepStatus
from flowcore.exceptions import ArtifactLoadError
from flowcore.stores._postgres_ops import FIND_RUN, not_found, text
from flowcore.stores._sqlite_schema import decode_config, decode_hook_errors

__all__ = [
    "find_cached_many", "find_latest_cache_components_many", "list_runs", "read_artifact",
    "read_run", "read_step_logs",
]

# The columns SQLite's reads select, at schema version 5 (spelled out: SQLite's own lists grow
# with its later versions).
STEP_COLUMNS = (
    "id, run_id, name, step_name, status, attempts, cache_key, cache_miss_reason, start_time, "
    "end_time, error_type, error_message, error_traceback, hook_errors, cache_components, waited, "
    "config, upstream"
)
ARTIFACT_COLUMNS = ("id, name, uri, materializer, data_type, content_hash, size, "
                    "producer_step_run_id, python_version")
RUN_COLUMNS = ("id, name, pipeline_name, status, start_time, end_time, parameters, unlisted, "
               "resumed_from, source")
_ART_SELECT = ", ".join("a." + c.strip() for c in ARTIFACT_COLUMNS.split(","))
_STEP_SELECT = ", ".join("s." + c.strip() for c in STEP_COLUMNS.split(","))


def _artifact(row: Any) -> ArtifactVersion:
    return ArtifactVersion(
        id=row["id"], name=row["name"], uri=row["uri"], materializer=row["materializer"],
        data_type=row["data_type"], content_hash=row["content_hash"], size=row["size"],
        producer_step_run_id=row["producer_step_run_id"], python_version=row["python_version"],
    )


def _step(row: Any) -> StepRun:
    sr = StepRun(id=row["id"], name=row["name"], step_name=row["step_name"],
                 pipeline_run_id=row["run_id"], config=decode_config(row["config"]),
                 status=StepStatus(row["status"]))
    sr.attempts = row["attempts"]
    sr.cache_key = row["cache_key"]
    sr.cache_miss_reason = row["cache_miss_reason"]
    sr.start_time = row["start_time"]
    sr.end_time = row["end_time"]
    if row["error_type"] is not None:
        sr.error = ErrorInfo(type=row["error_type"], message=row["error_message"] or "",
                             traceback=row["error_traceback"] or "")
    sr.hook_errors = decode_hook_errors(row["hook_errors"])
    sr.upstream = tuple(json.loads(row["upstream"] or "[]"))
    if row["cache_components"] is not None:
        sr.cache_components = json.loads(row["cache_components"])
    sr.waited = row["waited"] or 0.0
    return sr


def _run(row: Any) -> PipelineRun:
    run = PipelineRun(id=row["id"], name=row["name"], pipeline_name=row["pipeline_name"],
                      start_time=row["start_time"], status=RunStatus(row["status"]),
                      parameters=json.loads(row["parameters"]), unlisted=row["unlisted"])
    run.end_time = row["end_time"]
    run.resumed_from = row["resumed_from"]
    run.source = row["source"]
    return run


async def _attach_outputs(conn: Any, steps: dict[str, StepRun]) -> None:
    if not steps:
        return
    rows = await conn.fetch(
        f"SELECT o.step_run_id AS step_run_id, o.output_name AS output_name, {_ART_SELECT} "
        "FROM step_outputs o JOIN artifacts a ON a.id = o.artifact_id "
        "WHERE o.step_run_id = ANY($1::text[]) ORDER BY o.seq", list(steps))
    for row in rows:
        steps[row["step_run_id"]].outputs[row["output_name"]] = _artifact(row)


async def _runs_with_steps(conn: Any, run_ids: list[str]) -> list[PipelineRun]:
    runs = [_run(r) for r in await conn.fetch(
        f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ANY($1::text[]) "
        "ORDER BY start_time DESC, seq DESC", run_ids)]
    by_id = {run.id: run for run in runs}
    steps: dict[str, StepRun] = {}
    for row in await conn.fetch(f"SELECT {STEP_COLUMNS} FROM step_runs "
                                "WHERE run_id = ANY($1::text[]) ORDER BY run_id, position",
                                run_ids):
        sr = _step(row)
        by_id[sr.pipeline_run_id].steps[sr.name] = sr
        steps[sr.id] = sr
    await _attach_outputs(conn, steps)
    return runs


def _snapshot(conn: Any) -> Any:
    return conn.transaction(isolation="repeatable_read", readonly=True)


async def read_run(conn: Any, name_or_id: str) -> PipelineRun:
    """The run with that name (or else id), with its step runs and their outputs."""
    async with _snapshot(conn):
        run_id = await conn.fetchval(FIND_RUN, text(name_or_id))
        if run_id is None:
            raise not_found(name_or_id)
        return (await _runs_with_steps(conn, [run_id]))[0]


async def list_runs(conn: Any, pipeline_name: str | None, status: RunStatus | None,
                    limit: int) -> list[PipelineRun]:
    """Listed runs, newest first, with their step runs."""
    where: list[str] = ["NOT unlisted"]
    params: list[Any] = []
    if pipeline_name is not None:
        params.append(text(pipeline_name))
        where.append(f"pipeline_name = ${len(params)}")
    if status is not None:
        params.append(status.value)
        where.append(f"status = ${len(params)}")
    params.append(limit)
    async with _snapshot(conn):
        ids = [r["id"] for r in await conn.fetch(
            f"SELECT id FROM runs WHERE {' AND '.join(where)} "
            f"ORDER BY start_time DESC, seq DESC LIMIT ${len(params)}", *params)]
        return await _runs_with_steps(conn, ids)


async def read_artifact(conn: Any, artifact_id: str) -> ArtifactVersion:
    """One artifact row; an unknown id raises ArtifactLoadError."""
    row = await conn.fetchrow(f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE id = $1",
                              text(artifact_id))
    if row is None:
        raise ArtifactLoadError(f"no artifact version with id '{artifact_id}'")
    return _artifact(row)


async def read_step_logs(conn: Any, step_run_id: str) -> str:
    """What one step run printed and logged ('' if nothing)."""
    found = await conn.fetchval("SELECT text FROM step_logs WHERE step_run_id = $1",
                                text(step_run_id))
    return str(found) if found is not None else ""


async def find_cached_many(conn: Any, cache_keys: list[str]) -> dict[str, StepRun]:
    """The COMPLETED step runs indexed under each of `cache_keys` (missing keys are absent)."""
    async with _snapshot(conn):
        rows = await conn.fetch(
            f"SELECT c.cache_key AS cache_key_found, {_STEP_SELECT} "
            "FROM cache_entries c JOIN step_runs s ON s.id = c.step_run_id "
            "WHERE c.cache_key = ANY($1::text[]) AND s.status = $2",
            cache_keys, StepStatus.COMPLETED.value)
        found, steps = {}, {}
        for row in rows:
            sr = _step(row)
            found[row["cache_key_found"]] = sr
            steps[sr.id] = sr
        await _attach_outputs(conn, steps)
    return found


_COMPONENTS = """
SELECT t.ord, (
  SELECT s.cache_components FROM runs r
  JOIN step_runs s ON s.run_id = r.id AND s.name = t.name
  WHERE r.pipeline_name = (SELECT pipeline_name FROM runs WHERE id = t.run_id)
    AND r.id != t.run_id AND s.cache_components IS NOT NULL
  ORDER BY r.start_time DESC, r.seq DESC LIMIT 1) AS components
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(run_id, name, ord)
ORDER BY t.ord"""


async def find_latest_cache_components_many(conn: Any, items: list[tuple[str, str]]
                                            ) -> list[dict[str, str] | None]:
    """For each (run id, invocation ID): the cache key components of the newest step run of
    that name, in another run of the same pipeline, that has them (None if none); one query
    for all of them."""
    rows = await conn.fetch(_COMPONENTS, [i[0] for i in items], [text(i[1]) for i in items])
    return [None if r["components"] is None else json.loads(r["components"]) for r in rows]
