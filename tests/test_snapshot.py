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


async def test_snapshot_reads_text_the_server_does_not_convert_as_it_is(pg: TempCluster) -> None:
    # Raw bytes are decoded by snapshot.py, positionally: valid UTF-8 stays as it is.
    conn = await connect(pg)
    other = await connect(pg, application_name="snap-text")
    try:
        await other.execute("SELECT 'ünïcode ☃', ''")
        other_pid = other.get_server_pid()
        snap = await take_snapshot(conn, roles=["pg_monitor", "no_such_role"])
        s = next(x for x in snap.sessions if x.pid == other_pid)
        assert s.query == "SELECT 'ünïcode ☃', ''"
        assert (s.usename, s.datname) == ("postgres", "postgres")
        assert s.member_of == ()  # a superuser is no member of pg_monitor through grants
        assert s.blocked_by is None and s.wait_start is None
        assert s.client_port is not None and s.client_port > 0
        assert snap.in_recovery is False
    finally:
        await other.close()
        await conn.close()


async def test_snapshot_lists_membership_directly_or_through_other_roles(pg: TempCluster) -> None:
    pg.psql("""
        DROP ROLE IF EXISTS snap_user; DROP ROLE IF EXISTS snap_mid; DROP ROLE IF EXISTS snap_top;
        CREATE ROLE snap_top; CREATE ROLE snap_mid IN ROLE snap_top;
        CREATE ROLE snap_user LOGIN IN ROLE snap_mid;
    """)
    conn = await connect(pg)
    member = await connect(pg, "snap_user", application_name="snap-member")
    try:
        snap = await take_snapshot(conn, roles=["snap_top", "snap_mid", "absent_role"])
        by_pid = {s.pid: s for s in snap.sessions}
        assert by_pid[member.get_server_pid()].member_of == ("snap_mid", "snap_top")
        assert by_pid[conn.get_server_pid()].member_of == ()
        assert all(s.member_of == () for s in (await take_snapshot(conn)).sessions)
    finally:
        await member.close()
        await conn.close()
