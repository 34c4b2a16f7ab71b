"""Taking a snapshot of one server's sessions: the single query of each sweep."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from watchdog import queries
from watchdog.model import Session, Snapshot

_make = Session._make


def server_text(raw: bytes | None) -> str | None:
    """Text the server sent unconverted: UTF-8 where it is, other bytes kept as ``\\xNN``."""
    return None if raw is None else raw.decode("utf-8", "backslashreplace")


def _session(r: Any) -> Session:
    # Positional and spelled out: this runs once per backend per sweep, and a generic loop
    # over the fields costs twice as much. tests/test_snapshot.py pins the column order.
    u, d, q, member_of, blocked = r[3], r[5], r[12], r[15], r[16]
    return _make((
        r[0], r[1], r[2],
        None if u is None else u.decode("utf-8", "backslashreplace"),
        r[4],
        None if d is None else d.decode("utf-8", "backslashreplace"),
        r[6], r[7], r[8], r[9], r[10], r[11],
        None if q is None else q.decode("utf-8", "backslashreplace"),
        r[13], r[14],
        () if member_of is None else tuple(member_of),
        None if blocked is None else tuple(blocked),
        r[17], r[18],
    ))


def sessions_from_rows(rows: Any) -> tuple[Session, ...]:
    """The sessions of SNAPSHOT rows (the query lists Session's fields first, in order)."""
    return tuple([_session(r) for r in rows if r[0] is not None])


async def take_snapshot(
    conn: Any, timeout: float | None = None, roles: Sequence[str] = ()
) -> Snapshot:
    """Read pg_stat_activity and the server's limits in one statement.

    ``roles``: the roles member_of rules name; each session lists those its role is in.
    """
    rows = await conn.fetch(queries.SNAPSHOT, list(roles), timeout=timeout)
    # The server's values come in the one row without a session (the first, in practice).
    first = next(r for r in rows if r[0] is None)
    return Snapshot(
        now=first["now"],
        own_pid=first["own_pid"],
        server_version_num=first["version_num"],
        max_connections=first["max_connections"],
        superuser_reserved=first["su_reserved"],
        reserved=first["reserved"],
        sessions=sessions_from_rows(rows),
        in_recovery=first["in_recovery"],
    )
