"""Taking a snapshot of one server's sessions: the single query of each sweep."""

from __future__ import annotations

from typing import Any

from watchdog import queries
from watchdog.model import Session, Snapshot


def session_from_row(row: Any) -> Session:
    """A :class:`Session` from a pg_stat_activity row."""
    return Session(
        pid=row["pid"],
        backend_type=row["backend_type"] or "",
        backend_start=row["backend_start"],
        usename=row["usename"],
        rolsuper=row["rolsuper"],
        datname=row["datname"],
        application_name=row["application_name"] or "",
        client_addr=row["client_addr"],
        state=row["state"],
        state_change=row["state_change"],
        xact_start=row["xact_start"],
        query_start=row["query_start"],
        query=row["query"],
        leader_pid=row["leader_pid"],
    )


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
        sessions=tuple(session_from_row(r) for r in rows if r["pid"] is not None),
    )
