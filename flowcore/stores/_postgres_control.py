"""The PostgreSQL store's run control (API.md §15-16): cancel requests, run liveness and pool
leases, as async functions of one asyncpg connection.

Liveness is judged by heartbeat, on the database's clock (a pid means nothing on another
host, and two hosts' clocks may disagree): a RUNNING run whose last heartbeat is older than
the lapse is dead, unless this process runs it. A pid settles it at once only for a row
written in this very process space (same host name, boot and pid namespace: see
`process_space`), where a pid that is gone is really gone. A cancel request is a row plus a
`NOTIFY flowcore_cancel` carrying the run id, delivered when the transaction commits to every
store that listens, so the run's process hears it at once; pool leases expire on the
database's clock unless their holder renews them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from flowcore._models import RunStatus
from flowcore.stores._postgres_ops import CRASH_STEPS, FIND_RUN, not_found, text
from flowcore.stores._sqlite import _pid_alive

__all__ = [
    "CANCEL_CHANNEL",
    "Liveness",
    "acquire_slot",
    "drop_cancels",
    "pending_cancels",
    "process_space",
    "release_slot",
    "renew_slots",
    "request_cancel",
    "run_is_live",
]

CANCEL_CHANNEL = "flowcore_cancel"


def process_space() -> str:
    """Where a pid means something: the host name, and on Linux the boot id and the pid
    namespace (two containers may share a host name, never a namespace). Stored as a row's
    `host`."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:  # not Linux: the host name alone, as SQLite's store has it
        pass
    return "/".join(parts)


@dataclass(frozen=True)
class Liveness:
    """How this process judges whether a RUNNING run's process is still there."""

    space: str  # this process space (see process_space)
    stale_after: float  # seconds without a heartbeat, on the database's clock
    live_here: frozenset[str]  # the runs this process runs

    def pid_gone(self, run_id: str, pid: int | None, host: str | None) -> bool:
        """Whether the row's pid proves its process gone (only in this process space)."""
        if run_id in self.live_here or host != self.space or pid is None:
            return False
        # Our own pid on a run we do not run: an earlier process had it (pids are reused).
        return pid == os.getpid() or not _pid_alive(pid)

    def gone(self, row: Any) -> bool:
        """For a row with id, pid, host and `fresh` (heartbeat within the lapse)."""
        if row["id"] in self.live_here:
            return False
        return self.pid_gone(row["id"], row["pid"], row["host"]) or not row["fresh"]

_RUN_STATE = f"""
SELECT id, status, pid, host,
  COALESCE(heartbeat, start_time) >= now() - make_interval(secs => $2) AS fresh
FROM runs WHERE id = ({FIND_RUN})"""

_CRASH_ONE = f"""
WITH dead AS (
  UPDATE runs SET status = 'crashed', end_time = COALESCE(heartbeat, start_time)
  WHERE id = $1 AND status = 'running' RETURNING id, end_time
), steps AS ({CRASH_STEPS}
)
SELECT count(*) FROM dead"""


async def request_cancel(conn: Any, name_or_id: str, drain: bool, *, live: Liveness
                         ) -> tuple[str, RunStatus]:
    """Ask the process running a run to stop it; return the run's id and status.

    A finished run is left alone. A RUNNING run whose process is gone (see Liveness) is
    marked CRASHED here and now. Otherwise the request is stored (a stop
    without drain wins over a drain asked earlier; a newer request is never taken for one
    already delivered) and its process is notified.

    Raises:
        RunNotFoundError: no such run.
    """
    async with conn.transaction():
        row = await conn.fetchrow(_RUN_STATE + " FOR UPDATE", text(name_or_id), live.stale_after)
        if row is None:
            raise not_found(name_or_id)
        run_id, status = row["id"], RunStatus(row["status"])
        if status is not RunStatus.RUNNING:
            return run_id, status
        if live.gone(row):
            await conn.fetchval(_CRASH_ONE, run_id)
            return run_id, RunStatus.CRASHED
        await conn.execute(
            "INSERT INTO cancel_requests (run_id, drain, requested_at) "
            "VALUES ($1, $2, clock_timestamp()) ON CONFLICT (run_id) DO UPDATE SET "
            "drain = cancel_requests.drain AND excluded.drain, requested_at = excluded.requested_at",
            run_id, drain)
        # Delivered at commit, to every session listening: the owner wakes at once.
        await conn.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, run_id)
    return run_id, RunStatus.RUNNING


async def run_is_live(conn: Any, name_or_id: str, *, live: Liveness) -> bool:
    """Whether the run is RUNNING and its process still there (see Liveness)."""
    row = await conn.fetchrow(_RUN_STATE, text(name_or_id), live.stale_after)
    if row is None:
        raise not_found(name_or_id)
    return row["status"] == RunStatus.RUNNING.value and not live.gone(row)


async def pending_cancels(conn: Any, run_ids: list[str]) -> list[tuple[str, bool, datetime]]:
    """The cancel requests waiting for any of `run_ids`: (run id, drain, requested at)."""
    rows = await conn.fetch("SELECT run_id, drain, requested_at FROM cancel_requests "
                            "WHERE run_id = ANY($1::text[])", run_ids)
    return [(r["run_id"], r["drain"], r["requested_at"]) for r in rows]


async def drop_cancels(conn: Any, taken: list[tuple[str, bool, datetime]]) -> None:
    """Delete the requests that were delivered (a newer one for the same run stays)."""
    await conn.execute(
        "DELETE FROM cancel_requests c USING unnest($1::text[], $2::timestamptz[]) AS t(id, at) "
        "WHERE c.run_id = t.id AND c.requested_at = t.at",
        [t[0] for t in taken], [t[2] for t in taken])


async def acquire_slot(conn: Any, pool: str, limit: int, holder: str, *, ttl: float, pid: int,
                       host: str) -> bool:
    """Take a slot of `pool` for `holder` if fewer than `limit` unexpired leases hold it.

    A transaction-scoped advisory lock per pool makes processes take turns, so two of them
    never both take the last slot. Expired leases, and those of dead processes in this
    process space, are dropped first; a holder that already has a lease keeps it (renewed).
    """
    pool = text(pool) or ""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                           "flowcore-pool:" + pool)
        await conn.execute("DELETE FROM pool_leases WHERE pool = $1 AND expires < now()", pool)
        # A holder in this process space whose pid is gone frees its slots at once.
        others = await conn.fetch("SELECT DISTINCT pid FROM pool_leases WHERE pool = $1 AND "
                                  "host = $2 AND pid != $3", pool, host, pid)
        dead = [r["pid"] for r in others if r["pid"] is not None and not _pid_alive(r["pid"])]
        if dead:
            await conn.execute("DELETE FROM pool_leases WHERE pool = $1 AND host = $2 AND "
                               "pid = ANY($3::int4[])", pool, host, dead)
        renewed = await conn.execute(
            "UPDATE pool_leases SET expires = now() + make_interval(secs => $3) "
            "WHERE pool = $1 AND holder = $2", pool, holder, ttl)
        if renewed != "UPDATE 0":
            return True
        held = await conn.fetchval("SELECT count(*) FROM pool_leases WHERE pool = $1", pool)
        if held >= limit:
            return False
        await conn.execute(
            "INSERT INTO pool_leases (pool, holder, expires, pid, host) "
            "VALUES ($1, $2, now() + make_interval(secs => $3), $4, $5)",
            pool, holder, ttl, pid, host)
    return True


async def release_slot(conn: Any, pool: str, holder: str) -> None:
    """Give a lease back (nothing if it already lapsed)."""
    await conn.execute("DELETE FROM pool_leases WHERE pool = $1 AND holder = $2",
                       text(pool), holder)


async def renew_slots(conn: Any, held: list[tuple[str, str]], ttl: float) -> None:
    """Push back the expiry of the leases this store holds (one statement for all)."""
    await conn.execute(
        "UPDATE pool_leases l SET expires = now() + make_interval(secs => $3) "
        "FROM unnest($1::text[], $2::text[]) AS t(pool, holder) "
        "WHERE l.pool = t.pool AND l.holder = t.holder",
        [text(p) for p, _ in held], [h for _, h in held], ttl)
