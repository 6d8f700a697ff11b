"""The SQLite metadata schema, its forward migrations and the value encodings it stores.

Everything here is synchronous and runs in the metadata store's connection thread.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from flowcore._models import ErrorInfo, HookError, StepRunConfig
from flowcore.exceptions import StoreError

__all__ = [
    "LATEST_VERSION",
    "decode_config",
    "decode_hook_errors",
    "encode_config",
    "encode_hook_errors",
    "encode_mapping",
    "from_iso",
    "migrate",
    "to_iso",
]

# version -> the statements that bring a database from version-1 to version. Never edit a
# released version: add the next one (e.g. 2: ("ALTER TABLE runs ADD COLUMN ...",)).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE pipelines (
            name TEXT PRIMARY KEY,
            created TEXT NOT NULL
        )""",
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            pipeline_name TEXT NOT NULL,
            status TEXT NOT NULL,
            start_time TEXT NOT NULL,
            end_time TEXT,
            parameters TEXT NOT NULL DEFAULT '{}',
            unlisted INTEGER NOT NULL DEFAULT 0,
            pid INTEGER,
            host TEXT,
            heartbeat TEXT
        )""",
        # The unique index is what decides between two processes creating the same name.
        "CREATE UNIQUE INDEX runs_name ON runs(name)",
        "CREATE INDEX runs_newest ON runs(start_time)",
        "CREATE INDEX runs_pipeline ON runs(pipeline_name, start_time)",
        "CREATE INDEX runs_running ON runs(status) WHERE status = 'running'",
        """CREATE TABLE step_runs (
            id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            step_name TEXT NOT NULL,
            position INTEGER NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            cache_key TEXT,
            cache_miss_reason TEXT,
            start_time TEXT,
            end_time TEXT,
            error_type TEXT,
            error_message TEXT,
            error_traceback TEXT,
            hook_errors TEXT NOT NULL DEFAULT '[]',
            config TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE UNIQUE INDEX step_runs_name ON step_runs(run_id, name)",
        "CREATE INDEX step_runs_order ON step_runs(run_id, position)",
        """CREATE TABLE artifacts (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            uri TEXT NOT NULL,
            materializer TEXT NOT NULL,
            data_type TEXT NOT NULL,
            content_hash TEXT,
            size INTEGER,
            producer_step_run_id TEXT,
            python_version TEXT,
            created TEXT NOT NULL
        )""",
        """CREATE TABLE step_outputs (
            step_run_id TEXT NOT NULL REFERENCES step_runs(id) ON DELETE CASCADE,
            output_name TEXT NOT NULL,
            artifact_id TEXT NOT NULL REFERENCES artifacts(id),
            PRIMARY KEY (step_run_id, output_name)
        )""",
        """CREATE TABLE cache_entries (
            cache_key TEXT PRIMARY KEY,
            step_run_id TEXT NOT NULL REFERENCES step_runs(id) ON DELETE CASCADE,
            pipeline_name TEXT NOT NULL,
            created TEXT NOT NULL
        )""",
        "CREATE INDEX cache_entries_step ON cache_entries(step_run_id)",
        "CREATE INDEX cache_entries_pipeline ON cache_entries(pipeline_name)",
    ),
    # 2: what each step printed and logged, kept apart so listing runs never reads it; the
    # invocation IDs each step run depends on (to draw the DAG of a stored run).
    2: (
        """CREATE TABLE step_logs (
            step_run_id TEXT PRIMARY KEY REFERENCES step_runs(id) ON DELETE CASCADE,
            text TEXT NOT NULL
        )""",
        "ALTER TABLE step_runs ADD COLUMN upstream TEXT NOT NULL DEFAULT '[]'",
    ),
    # 3: the step rows that are not finished, so that opening the store finds those of
    # finished runs (to stop them) without reading the whole history.
    3: (
        "CREATE INDEX step_runs_unfinished ON step_runs(run_id) "
        "WHERE status IN ('pending', 'running', 'retrying')",
    ),
    # 4: the digest of each part of a step run's cache key (JSON), so a later miss can say
    # which part changed.
    4: ("ALTER TABLE step_runs ADD COLUMN cache_components TEXT",),
    # 5: controlling runs (API.md §14-16): the run a run resumed and where its pipeline is
    # defined; how long a step waited for a pool slot; cancel requests from any process,
    # picked up by the process running the run; pool slots as leases that lapse unless their
    # holder renews them (a killed process frees its slots).
    5: (
        "ALTER TABLE runs ADD COLUMN resumed_from TEXT",
        "ALTER TABLE runs ADD COLUMN source TEXT",
        "ALTER TABLE step_runs ADD COLUMN waited REAL NOT NULL DEFAULT 0",
        """CREATE TABLE cancel_requests (
            run_id TEXT PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
            drain INTEGER NOT NULL,
            requested_at TEXT NOT NULL
        )""",
        """CREATE TABLE pool_leases (
            pool TEXT NOT NULL,
            holder TEXT NOT NULL,
            expires REAL NOT NULL,
            pid INTEGER,
            host TEXT,
            PRIMARY KEY (pool, holder)
        )""",
    ),
    # 6: the bytes of a small artifact kept inline, in its row (see _sqlite_inline); NULL for
    # an artifact stored in the artifact store.
    6: ("ALTER TABLE artifacts ADD COLUMN content BLOB",),
}
LATEST_VERSION = max(_MIGRATIONS)


def migrate(db: sqlite3.Connection, label: str) -> int:
    """Bring the schema up to `LATEST_VERSION` in one write transaction; return the version.

    Several processes may open a new database at once: BEGIN IMMEDIATE makes them take turns,
    and each one re-reads the version inside its transaction.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
        if current > LATEST_VERSION:
            raise StoreError(
                f"metadata store {label} has schema version {current}, newer than this "
                f"flowcore understands ({LATEST_VERSION}); upgrade flowcore"
            )
        for version in range(current + 1, LATEST_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return LATEST_VERSION


def to_iso(value: datetime | None) -> str | None:
    """A UTC ISO-8601 text with microseconds (so text order is time order); naive means UTC."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = (value.replace(tzinfo=UTC) if value.tzinfo is None else value).astimezone(UTC)
    # isoformat() without `timespec` is about twice as fast (a few calls per step); it drops
    # a zero microsecond, put back so every text has the same width.
    text = value.isoformat()
    return text if value.microsecond else f"{text[:19]}.000000{text[19:]}"


def from_iso(value: str | None) -> datetime | None:
    """The timezone-aware datetime stored by `to_iso`."""
    return None if value is None else datetime.fromisoformat(value)


def _json_default(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # pydantic models: their JSON form
    if callable(dump):
        return dump(mode="json")
    return repr(value)


def _safe(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """The mapping with every value JSON cannot hold (non-string keys, cycles) as its repr."""
    if not mapping:
        return {}
    try:
        # The common case: everything is JSON already; one check for the whole mapping.
        json.dumps(mapping, default=_json_default)
        if all(type(k) is str for k in mapping):
            return dict(mapping)
    except (TypeError, ValueError, RecursionError):
        pass
    safe: dict[str, Any] = {}
    for key, value in mapping.items():
        try:
            json.dumps(value, default=_json_default)
        except (TypeError, ValueError, RecursionError):
            value = repr(value)
        safe[str(key)] = value
    return safe


def encode_mapping(mapping: Mapping[str, Any]) -> str:
    """JSON of a mapping; values JSON cannot hold are stored as their repr."""
    return json.dumps(_safe(mapping), default=_json_default)


def encode_config(config: StepRunConfig) -> str:
    """JSON of a step run's configuration."""
    if not config.parameters and not config.settings and config.step_operator is None and (
        config.experiment_tracker is None
    ):
        return _PLAIN_CONFIG[config.enable_cache]
    parameters, settings = config.parameters, config.settings
    if type(parameters) is dict and type(settings) is dict and all(
            type(k) is str for k in parameters) and all(type(k) is str for k in settings):
        # The common case, in one encoding: what the checked form below gives when every
        # value is JSON already.
        try:
            return json.dumps({"parameters": parameters, "enable_cache": config.enable_cache,
                               "step_operator": config.step_operator,
                               "experiment_tracker": config.experiment_tracker,
                               "settings": settings}, default=_json_default)
        except (TypeError, ValueError, RecursionError):
            pass
    return json.dumps(
        {
            "parameters": _safe(parameters),
            "enable_cache": config.enable_cache,
            "step_operator": config.step_operator,
            "experiment_tracker": config.experiment_tracker,
            "settings": _safe(settings),
        },
        default=_json_default,
    )


_PLAIN_CONFIG = {
    flag: json.dumps({"parameters": {}, "enable_cache": flag, "step_operator": None,
                      "experiment_tracker": None, "settings": {}})
    for flag in (True, False)
}


def decode_config(text: str) -> StepRunConfig:
    """The StepRunConfig stored by `encode_config`."""
    doc = json.loads(text)
    return StepRunConfig(
        parameters=doc.get("parameters", {}),
        enable_cache=doc.get("enable_cache", True),
        step_operator=doc.get("step_operator"),
        experiment_tracker=doc.get("experiment_tracker"),
        settings=doc.get("settings", {}),
    )


def encode_hook_errors(errors: list[HookError]) -> str:
    """JSON of a step run's hook errors."""
    if not errors:
        return "[]"
    return json.dumps([
        {"hook": e.hook, "kind": e.kind, "type": e.error.type, "message": e.error.message,
         "traceback": e.error.traceback}
        for e in errors
    ])


def decode_hook_errors(text: str) -> list[HookError]:
    """The hook errors stored by `encode_hook_errors`."""
    return [
        HookError(hook=d["hook"], kind=d["kind"],
                  error=ErrorInfo(type=d["type"], message=d["message"], traceback=d["traceback"]))
        for d in json.loads(text)
    ]
