"""The snapshot query against real servers: its shape, its limits and its clock."""

from __future__ import annotations

from helpers import connect

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.core.model import CLIENT_BACKEND
from watchdog.pg import queries, snapshot
from watchdog.pg.snapshot import take_snapshot


async def test_snapshot_columns_are_where_snapshot_py_reads_them(pg: TempCluster) -> None:
    # sessions_from_rows reads the rows positionally: the query and the code must agree.
    conn = await connect(pg)
    try:
        rows = await conn.fetch(queries.SNAPSHOT, [], snapshot.ALL_NAMES_UP_TO)
        names = list(rows[0].keys())
        assert names[:17] == [
            "pid", "backend_type", "backend_start", "usesysid", "datid", "application_name",
            "client_addr", "state", "state_change", "xact_start", "query_start", "query",
            "leader_pid", "client_port", "blocked_by", "wait_start", "xmin_age",
        ]
        positions = {
            "pid": snapshot.PID, "backend_type": snapshot.BACKEND_TYPE,
            "usesysid": snapshot.USESYSID, "datid": snapshot.DATID, "query": snapshot.QUERY,
            "blocked_by": snapshot.BLOCKED_BY, "name": snapshot.NAME,
            "rolsuper": snapshot.ROLSUPER, "member_of": snapshot.MEMBER_OF,
            "now": snapshot.NOW, "server": snapshot.SERVER,
        }
        assert names == [*names[:17], "name", "rolsuper", "member_of", "now", "server"]
        assert {n: names.index(n) for n in positions} == positions
        # One row of server values, then roles and databases, then backends.
        kinds = [
            "server" if r["pid"] is None and r["usesysid"] is None and r["datid"] is None
            else "role" if r["usesysid"] is not None and r["pid"] is None
            else "database" if r["pid"] is None
            else "backend"
            for r in rows
        ]
        assert kinds.count("server") == 1
        assert kinds.count("role") == await conn.fetchval("SELECT count(*) FROM pg_roles")
        assert kinds.count("database") == await conn.fetchval("SELECT count(*) FROM pg_database")
    finally:
        await conn.close()


async def test_snapshot_names_only_the_roles_in_use_on_a_server_with_many(
    pg: TempCluster,
) -> None:
    # Past ALL_NAMES_UP_TO roles or databases, only those of the backends present are sent:
    # the sessions come out the same, with far fewer rows.
    pg.psql("DROP ROLE IF EXISTS snap_many; CREATE ROLE snap_many LOGIN IN ROLE pg_monitor")
    conn = await connect(pg)
    other = await connect(pg, "snap_many", application_name="snap-many")
    try:
        roles = ["pg_monitor", "pg_read_all_stats"]
        rows_all = await conn.fetch(queries.SNAPSHOT, roles, 10_000)
        rows_few = await conn.fetch(queries.SNAPSHOT, roles, 0)
        in_use = {r["usesysid"] for r in rows_all if r["pid"] is not None} - {None, 0}
        dbs_in_use = {r["datid"] for r in rows_all if r["pid"] is not None} - {None, 0}
        named = {r["usesysid"] for r in rows_few if r["pid"] is None and r["usesysid"]}
        dbs_named = {r["datid"] for r in rows_few if r["pid"] is None and r["datid"]}
        assert named == in_use and dbs_named == dbs_in_use
        assert len(rows_few) < len(rows_all)

        def who(rows: list[object]) -> dict[int, tuple[object, ...]]:
            return {
                s.pid: (s.usename, s.rolsuper, s.datname, s.member_of, s.backend_type)
                for s in snapshot.sessions_from_rows(rows)
            }

        assert who(rows_few) == who(rows_all)
        assert who(rows_few)[other.get_server_pid()] == (
            "snap_many", False, "postgres", ("pg_monitor", "pg_read_all_stats"), CLIENT_BACKEND
        )
    finally:
        await other.close()
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
