"""Taking a snapshot of one server's sessions: the single query of each sweep."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from watchdog.core.model import CLIENT_BACKEND, Session, Snapshot
from watchdog.pg import queries

# Roles and databases sent in full up to this many (SNAPSHOT's $2); beyond, only those of the
# backends present. A few hundred rows cost less than looking up which ones are in use.
ALL_NAMES_UP_TO = 500

# Column positions in SNAPSHOT's rows (tests/test_snapshot.py pins them against the query).
PID, BACKEND_TYPE, USESYSID, DATID, QUERY, BLOCKED_BY = 0, 1, 3, 4, 11, 14
NAME, ROLSUPER, MEMBER_OF, NOW, SERVER = 17, 18, 19, 20, 21

_NO_ROLE: tuple[str | None, bool | None, tuple[str, ...]] = (None, None, ())
_new = tuple.__new__


def server_text(raw: bytes | None) -> str | None:
    """Text the server sent unconverted: UTF-8 where it is, other bytes kept as ``\\xNN``."""
    return None if raw is None else raw.decode("utf-8", "backslashreplace")


def sessions_from_rows(rows: Sequence[Any]) -> tuple[Session, ...]:
    """The sessions of SNAPSHOT rows, each with its role's and database's names."""
    roles: dict[int, tuple[str | None, bool | None, tuple[str, ...]]] = {}
    databases: dict[int, str | None] = {}
    for r in [r for r in rows if r[PID] is None]:
        if r[USESYSID] is not None:
            member_of = r[MEMBER_OF]
            roles[r[USESYSID]] = (
                server_text(r[NAME]), r[ROLSUPER], () if member_of is None else tuple(member_of)
            )
        elif r[DATID] is not None:
            databases[r[DATID]] = server_text(r[NAME])
    role = roles.get
    database = databases.get
    # Positional and spelled out, in one comprehension: this runs once per backend per sweep,
    # and a generic loop over the fields, or a call per row, costs more.
    return tuple([
        _new(Session, (
            r[0], CLIENT_BACKEND if (kind := r[1]) is None else kind, r[2],
            (u := role(r[3], _NO_ROLE))[0], u[1], database(r[4]),
            r[5], r[6], r[7], r[8], r[9], r[10],
            None if (q := r[11]) is None else q.decode("utf-8", "backslashreplace"),
            r[12], r[13], u[2], None if (blocked := r[14]) is None else tuple(blocked),
            r[15], r[16],
        ))
        for r in rows
        if r[0] is not None
    ])


async def take_snapshot(
    conn: Any, timeout: float | None = None, roles: Sequence[str] = ()
) -> Snapshot:
    """Read pg_stat_activity and the server's limits in one statement.

    ``roles``: the roles member_of rules name; each session lists those its role is in.
    """
    rows = await conn.fetch(queries.SNAPSHOT, list(roles), ALL_NAMES_UP_TO, timeout=timeout)
    # The server's values come in the one row that is neither a session, a role nor a database.
    first = next(r for r in rows if r[PID] is None and r[USESYSID] is None and r[DATID] is None)
    own_pid, version_num, max_connections, su_reserved, reserved, in_recovery = first[SERVER]
    return Snapshot(
        now=first[NOW],
        own_pid=own_pid,
        server_version_num=version_num,
        max_connections=max_connections,
        superuser_reserved=su_reserved,
        reserved=reserved,
        sessions=sessions_from_rows(rows),
        in_recovery=bool(in_recovery),
    )
