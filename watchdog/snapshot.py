"""Taking a snapshot of one server's sessions: the single query of each sweep."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from watchdog import queries
from watchdog.model import Session, Snapshot

_make = Session._make
_N = len(Session._fields)
# Columns SNAPSHOT sends as raw bytes (the server does not convert them; see queries.py).
_RAW = tuple(Session._fields.index(name) for name in ("usename", "datname", "query"))
_MEMBER_OF = Session._fields.index("member_of")
_BLOCKED_BY = Session._fields.index("blocked_by")


def server_text(raw: bytes | None) -> str | None:
    """Text the server sent unconverted: UTF-8 where it is, other bytes kept as ``\\xNN``."""
    return None if raw is None else raw.decode("utf-8", "backslashreplace")


def _session(row: Any) -> Session:
    values = list(row[:_N])
    for i in _RAW:
        values[i] = server_text(values[i])
    values[_MEMBER_OF] = tuple(values[_MEMBER_OF])
    if values[_BLOCKED_BY] is not None:
        values[_BLOCKED_BY] = tuple(values[_BLOCKED_BY])
    return _make(values)


def sessions_from_rows(rows: Any) -> tuple[Session, ...]:
    """The sessions of SNAPSHOT rows (the query lists Session's fields first, in order)."""
    return tuple(_session(r) for r in rows if r[0] is not None)


async def take_snapshot(
    conn: Any, timeout: float | None = None, roles: Sequence[str] = ()
) -> Snapshot:
    """Read pg_stat_activity and the server's limits in one statement.

    ``roles``: the roles member_of rules name; each session lists those its role is in.
    """
    rows = await conn.fetch(queries.SNAPSHOT, list(roles), timeout=timeout)
    first = rows[0]
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
