"""Taking a snapshot of one server's sessions: the single query of each sweep."""

from __future__ import annotations

from typing import Any

from watchdog import queries
from watchdog.model import Session, Snapshot

_make = Session._make
_N = len(Session._fields)


def sessions_from_rows(rows: Any) -> tuple[Session, ...]:
    """The sessions of SNAPSHOT rows (the query lists Session's fields first, in order)."""
    return tuple(_make(r[:_N]) for r in rows if r[0] is not None)


async def take_snapshot(conn: Any, timeout: float | None = None) -> Snapshot:
    """Read pg_stat_activity and the server's limits in one statement."""
    rows = await conn.fetch(queries.SNAPSHOT, timeout=timeout)
    first = rows[0]
    return Snapshot(
        now=first["now"],
        own_pid=first["own_pid"],
        server_version_num=first["version_num"],
        max_connections=first["max_connections"],
        superuser_reserved=first["su_reserved"],
        reserved=first["reserved"],
        sessions=sessions_from_rows(rows),
    )
