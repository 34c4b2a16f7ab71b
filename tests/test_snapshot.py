"""The snapshot query against real servers: its shape, its limits and its clock."""

from __future__ import annotations

from helpers import connect

from watchdog import queries
from watchdog.model import CLIENT_BACKEND, Session
from watchdog.snapshot import take_snapshot
from watchdog.tempcluster import TempCluster


async def test_snapshot_columns_start_with_the_session_fields_in_order(pg: TempCluster) -> None:
    # take_snapshot builds Sessions positionally: the query and the type must agree.
    conn = await connect(pg)
    try:
        row = (await conn.fetch(queries.SNAPSHOT, []))[0]
        assert list(row.keys())[: len(Session._fields)] == list(Session._fields)
    finally:
        await conn.close()


async def test_snapshot_sees_sessions_limits_and_itself(pg: TempCluster) -> None:
    conn = await connect(pg)
    other = await connect(pg, application_name="snap-test")
    try:
        other_pid = await other.fetchval("SELECT pg_backend_pid()")
        snap = await take_snapshot(conn)
        by_pid = {s.pid: s for s in snap.sessions}
        assert snap.own_pid == await conn.fetchval("SELECT pg_backend_pid()")
        assert snap.server_version_num // 10000 == pg.major
        assert snap.max_connections == 30 and snap.superuser_reserved == 3
        assert snap.capacity == 27 - snap.reserved
        s = by_pid[other_pid]
        assert (s.backend_type, s.application_name, s.state) == (
            CLIENT_BACKEND,
            "snap-test",
            "idle",
        )
        assert s.usename == "postgres" and s.rolsuper is True and s.client_addr == "127.0.0.1"
        assert s.backend_start is not None and s.state_change is not None
        assert snap.now >= s.state_change
        # Background processes are in the snapshot too (and the decision spares them).
        assert any(x.backend_type != CLIENT_BACKEND for x in snap.sessions)
        assert snap.used == sum(1 for x in snap.sessions if x.backend_type == CLIENT_BACKEND)
    finally:
        await other.close()
        await conn.close()
