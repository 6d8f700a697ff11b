"""The PostgreSQL metadata schema and its migrations.

The tables, columns and meanings are SQLite's (`_sqlite_schema`), with PostgreSQL types:
times are `timestamptz`, flags `boolean`, JSON documents stay text (encoded and decoded by the
same functions as SQLite's). Two additions only PostgreSQL needs: `seq` identity columns
stand in for SQLite's rowid (the tie-breaker of equal start times, and output order), and a
lease's expiry is a time on the database's clock. Version numbers follow SQLite's: a new
PostgreSQL database starts at SQLite's version 5 (there were never older ones).
"""

from __future__ import annotations

from typing import Any

from flowcore.exceptions import StoreError

__all__ = ["LATEST_VERSION", "MIGRATION_LOCK", "migrate"]

# Several processes may open a new database at once: they take turns on this advisory lock
# (a constant of our own; advisory locks are per database) and each re-reads the version.
MIGRATION_LOCK = 0x666C6F77  # "flow"

# version -> statements. Never edit a released version: add the next one (and SQLite's).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    5: (
        """CREATE TABLE pipelines (
            name TEXT PRIMARY KEY,
            created TIMESTAMPTZ NOT NULL
        )""",
        """CREATE TABLE runs (
            seq BIGINT GENERATED ALWAYS AS IDENTITY,
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            pipeline_name TEXT NOT NULL,
            status TEXT NOT NULL,
            start_time TIMESTAMPTZ NOT NULL,
            end_time TIMESTAMPTZ,
            parameters TEXT NOT NULL DEFAULT '{}',
            unlisted BOOLEAN NOT NULL DEFAULT FALSE,
            pid INTEGER,
            host TEXT,
            heartbeat TIMESTAMPTZ,
            resumed_from TEXT,
            source TEXT
        )""",
        # The unique index is what decides between two processes creating the same name.
        "CREATE UNIQUE INDEX runs_name ON runs(name)",
        "CREATE INDEX runs_newest ON runs(start_time, seq)",
        "CREATE INDEX runs_pipeline ON runs(pipeline_name, start_time, seq)",
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
            start_time TIMESTAMPTZ,
            end_time TIMESTAMPTZ,
            error_type TEXT,
            error_message TEXT,
            error_traceback TEXT,
            hook_errors TEXT NOT NULL DEFAULT '[]',
            config TEXT NOT NULL DEFAULT '{}',
            upstream TEXT NOT NULL DEFAULT '[]',
            cache_components TEXT,
            waited DOUBLE PRECISION NOT NULL DEFAULT 0
        )""",
        "CREATE UNIQUE INDEX step_runs_name ON step_runs(run_id, name)",
        "CREATE INDEX step_runs_order ON step_runs(run_id, position)",
        "CREATE INDEX step_runs_unfinished ON step_runs(run_id) "
        "WHERE status IN ('pending', 'running', 'retrying')",
        """CREATE TABLE artifacts (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            uri TEXT NOT NULL,
            materializer TEXT NOT NULL,
            data_type TEXT NOT NULL,
            content_hash TEXT,
            size BIGINT,
            producer_step_run_id TEXT,
            python_version TEXT,
            created TIMESTAMPTZ NOT NULL
        )""",
        """CREATE TABLE step_outputs (
            seq BIGINT GENERATED ALWAYS AS IDENTITY,
            step_run_id TEXT NOT NULL REFERENCES step_runs(id) ON DELETE CASCADE,
            output_name TEXT NOT NULL,
            artifact_id TEXT NOT NULL REFERENCES artifacts(id),
            PRIMARY KEY (step_run_id, output_name)
        )""",
        """CREATE TABLE cache_entries (
            cache_key TEXT PRIMARY KEY,
            step_run_id TEXT NOT NULL REFERENCES step_runs(id) ON DELETE CASCADE,
            pipeline_name TEXT NOT NULL,
            created TIMESTAMPTZ NOT NULL
        )""",
        "CREATE INDEX cache_entries_step ON cache_entries(step_run_id)",
        "CREATE INDEX cache_entries_pipeline ON cache_entries(pipeline_name)",
        """CREATE TABLE step_logs (
            step_run_id TEXT PRIMARY KEY REFERENCES step_runs(id) ON DELETE CASCADE,
            text TEXT NOT NULL
        )""",
        """CREATE TABLE cancel_requests (
            run_id TEXT PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
            drain BOOLEAN NOT NULL,
            requested_at TIMESTAMPTZ NOT NULL
        )""",
        """CREATE TABLE pool_leases (
            pool TEXT NOT NULL,
            holder TEXT NOT NULL,
            expires TIMESTAMPTZ NOT NULL,
            pid INTEGER,
            host TEXT,
            PRIMARY KEY (pool, holder)
        )""",
    ),
}
LATEST_VERSION = max(_MIGRATIONS)
FIRST_VERSION = min(_MIGRATIONS)


async def migrate(conn: Any, label: str) -> int:
    """Bring the schema up to `LATEST_VERSION` in one transaction; return the version.

    The advisory lock makes concurrent openers take turns; the second one finds the schema
    current and changes nothing.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = await conn.fetchval("SELECT MAX(version) FROM schema_version") or 0
        if current > LATEST_VERSION:
            raise StoreError(
                f"metadata store {label} has schema version {current}, newer than this "
                f"flowcore understands ({LATEST_VERSION}); upgrade flowcore"
            )
        for version in range(max(current + 1, FIRST_VERSION), LATEST_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
    return LATEST_VERSION
