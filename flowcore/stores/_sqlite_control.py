"""The SQLite store's run control (API.md §15-16): cancel requests and pool leases.

Synchronous functions of one sqlite3 connection, run in the store's connection thread inside
the transaction the caller opened (a group commit for writes, a read snapshot for reads).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from flowcore._models import RunStatus, encodable
from flowcore.stores._sqlite_ops import crash_run
from flowcore.stores._sqlite_reads import find_run_row
from flowcore.stores._sqlite_schema import from_iso, to_iso

__all__ = [
    "Liveness", "acquire_slot", "drop_cancels", "pending_cancels", "release_slot",
    "renew_slots", "request_cancel", "run_is_live",
]


@dataclass(frozen=True)
class Liveness:
    """How to tell whether the process running a RUNNING run is still there."""

    host: str
    now: datetime
    stale_after: timedelta
    is_dead: Callable[[int | None, str], bool]  # (pid, run id) on this host

    def owner_gone(self, row: sqlite3.Row) -> tuple[bool, datetime | None]:
        """Whether the run's process is gone, and the run's last sign of life.

        On this host a dead pid settles it; on any host so does a heartbeat older than the
        crash threshold (a pid means nothing on another host, and may have been reused here).
        """
        last = from_iso(row["heartbeat"] or row["start_time"])
        if row["host"] == self.host and self.is_dead(row["pid"], row["id"]):
            return True, last
        return last is None or self.now - last > self.stale_after, last


def _run_row(db: sqlite3.Connection, name_or_id: str) -> sqlite3.Row:
    run_id = find_run_row(db, name_or_id)["id"]
    row: sqlite3.Row = db.execute(
        "SELECT id, status, pid, host, heartbeat, start_time FROM runs WHERE id = ?", (run_id,)
    ).fetchone()
    return row


def request_cancel(db: sqlite3.Connection, name_or_id: str, drain: bool, *, live: Liveness
                   ) -> tuple[str, RunStatus]:
    """Ask the process running a run to stop it; return the run's id and status.

    A finished run is left alone. A RUNNING run whose process is gone is marked CRASHED here
    and now. Otherwise the request is stored for its process to pick up (a stop without
    drain wins over a drain asked for earlier) and RUNNING is returned.

    Raises:
        RunNotFoundError: no such run.
    """
    row = _run_row(db, name_or_id)
    status = RunStatus(row["status"])
    if status is not RunStatus.RUNNING:
        return row["id"], status
    gone, last = live.owner_gone(row)
    if gone:
        crash_run(db, row["id"], last)
        return row["id"], RunStatus.CRASHED
    db.execute(
        "INSERT INTO cancel_requests (run_id, drain, requested_at) VALUES (?, ?, ?) "
        # A merged request is a new one: its new time keeps drop_cancels() from deleting it
        # when it lands after the older one was read but before that was dropped.
        "ON CONFLICT(run_id) DO UPDATE SET drain = MIN(drain, excluded.drain), "
        "requested_at = excluded.requested_at",
        (row["id"], int(drain), to_iso(live.now)),
    )
    return row["id"], RunStatus.RUNNING


def run_is_live(db: sqlite3.Connection, name_or_id: str, *, live: Liveness) -> bool:
    """Whether the run is RUNNING and its process is still there (RunNotFoundError if unknown)."""
    row = _run_row(db, name_or_id)
    return row["status"] == RunStatus.RUNNING.value and not live.owner_gone(row)[0]


def pending_cancels(db: sqlite3.Connection, run_ids: list[str]) -> list[tuple[str, bool, str]]:
    """The cancel requests waiting for any of `run_ids`: (run id, drain, requested at)."""
    found: list[tuple[str, bool, str]] = []
    for start in range(0, len(run_ids), 500):  # SQLite's bound-parameter limit
        chunk = run_ids[start:start + 500]
        rows = db.execute(
            "SELECT run_id, drain, requested_at FROM cancel_requests "
            f"WHERE run_id IN ({', '.join('?' * len(chunk))})", chunk).fetchall()
        found.extend((r["run_id"], bool(r["drain"]), r["requested_at"]) for r in rows)
    return found


def drop_cancels(db: sqlite3.Connection, taken: Iterable[tuple[str, bool, str]]) -> None:
    """Delete the requests that were delivered (a newer one for the same run stays)."""
    db.executemany("DELETE FROM cancel_requests WHERE run_id = ? AND requested_at = ?",
                   [(run_id, at) for run_id, _, at in taken])


def acquire_slot(db: sqlite3.Connection, pool: str, limit: int, holder: str, *, now: float,
                 ttl: float, pid: int, host: str, pid_dead: Callable[[int], bool]) -> bool:
    """Take a slot of `pool` for `holder` if fewer than `limit` unexpired leases hold it.

    One transaction counts and inserts, so two processes never both take the last slot.
    Leases that expired, and those of dead processes on this host, are dropped first. A
    holder that already has a lease keeps it (renewed).
    """
    pool = encodable(pool)
    db.execute("DELETE FROM pool_leases WHERE pool = ? AND expires < ?", (pool, now))
    for row in db.execute("SELECT DISTINCT pid FROM pool_leases WHERE pool = ? AND host = ? "
                          "AND pid != ?", (pool, host, pid)).fetchall():
        if row["pid"] is not None and pid_dead(row["pid"]):
            db.execute("DELETE FROM pool_leases WHERE pool = ? AND host = ? AND pid = ?",
                       (pool, host, row["pid"]))
    mine = db.execute("UPDATE pool_leases SET expires = ? WHERE pool = ? AND holder = ?",
                      (now + ttl, pool, holder)).rowcount
    if mine:
        return True
    held = db.execute("SELECT COUNT(*) FROM pool_leases WHERE pool = ?", (pool,)).fetchone()[0]
    if held >= limit:
        return False
    db.execute("INSERT INTO pool_leases (pool, holder, expires, pid, host) VALUES (?, ?, ?, ?, ?)",
               (pool, holder, now + ttl, pid, host))
    return True


def release_slot(db: sqlite3.Connection, pool: str, holder: str) -> None:
    """Give a lease back (nothing if it already lapsed)."""
    db.execute("DELETE FROM pool_leases WHERE pool = ? AND holder = ?", (encodable(pool), holder))


def renew_slots(db: sqlite3.Connection, held: Iterable[tuple[str, str]], expires: float) -> None:
    """Push back the expiry of the leases this process holds."""
    db.executemany("UPDATE pool_leases SET expires = ? WHERE pool = ? AND holder = ?",
                   [(expires, encodable(pool), holder) for pool, holder in held])
