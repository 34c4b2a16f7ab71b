"""watchdog.pg.act against a real server: only explicit signals, and confirmation by whole pairs.

Actions are crafted by hand from a real snapshot and passed straight to ``execute`` (or its
confirmation look), the way a sweep would, without decide() in between.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from helpers import connect, wait_for
from scenario import APP_ROLE, WATCHDOG_ROLE

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.core.model import Action, Session
from watchdog.pg.act import execute, still_there
from watchdog.pg.snapshot import take_snapshot


@pytest.fixture
async def watchdog_conn(pg: TempCluster, admin: asyncpg.Connection) -> AsyncIterator[Any]:
    """The watchdog's least-privilege connection (``admin`` has created the roles)."""
    conn = await connect(pg, WATCHDOG_ROLE, "pg-watchdog")
    try:
        yield conn
    finally:
        await conn.close()


async def app_session(pg: TempCluster, name: str) -> asyncpg.Connection:
    conn = await connect(pg, APP_ROLE, name)
    await conn.execute("SELECT 1")
    return conn


async def session_of(watchdog_conn: Any, conn: asyncpg.Connection) -> Session:
    """The row of ``conn``'s backend, as the watchdog's snapshot sees it."""
    pid = conn.get_server_pid()
    snapshot = await take_snapshot(watchdog_conn)
    [session] = [s for s in snapshot.sessions if s.pid == pid]
    return session


def action(session: Session, verb: str) -> Action:
    return Action("main", "crafted", verb, False, session, "state_change", 10.0)


async def alive(admin: asyncpg.Connection, pid: int) -> bool:
    return bool(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid))


async def test_unknown_action_is_never_signalled(
    pg: TempCluster, admin: asyncpg.Connection, watchdog_conn: Any
) -> None:
    idle = await app_session(pg, "victim-bogus")
    busy = await connect(pg, APP_ROLE, "victim-bogus-busy")
    try:
        # A running statement would show a cancel as much as an idle session shows a kill.
        sleeper = asyncio.ensure_future(busy.execute("SELECT pg_sleep(3)"))
        busy_pid = busy.get_server_pid()

        async def running() -> bool:
            state = await admin.fetchval(
                "SELECT state FROM pg_stat_activity WHERE pid = $1", busy_pid
            )
            return bool(state == "active")

        await wait_for(running, what="the busy session's pg_sleep")
        targets = [await session_of(watchdog_conn, idle), await session_of(watchdog_conn, busy)]
        outcomes = await execute(watchdog_conn, [action(s, "bogus") for s in targets])
        assert [o.outcome for o in outcomes] == ["failed", "failed"]
        assert all("unknown action" in (o.error or "") for o in outcomes)
        assert await alive(admin, idle.get_server_pid())
        assert await idle.fetchval("SELECT 1") == 1  # not terminated
        await sleeper  # not cancelled: pg_sleep ran to its end without QueryCanceledError
        assert await alive(admin, busy_pid)
    finally:
        idle.terminate()
        busy.terminate()


async def test_confirmation_matches_pid_and_backend_start_as_pairs(
    pg: TempCluster, admin: asyncpg.Connection, watchdog_conn: Any
) -> None:
    one = await app_session(pg, "victim-pair-1")
    two = await app_session(pg, "victim-pair-2")
    try:
        a, b = await session_of(watchdog_conn, one), await session_of(watchdog_conn, two)
        assert await still_there(watchdog_conn, [a, b], 5) == {a.pid, b.pid}
        # a's pid with b's backend_start, and b's with a's: each pid and each start is in the
        # batch, but no pair is a backend that runs.
        crossed = [
            a._replace(backend_start=b.backend_start),
            b._replace(backend_start=a.backend_start),
        ]
        assert a.backend_start != b.backend_start
        assert await still_there(watchdog_conn, crossed, 5) == set()
        assert a.backend_start is not None
        later = a._replace(backend_start=a.backend_start + timedelta(microseconds=1))
        assert await still_there(watchdog_conn, [later, b], 5) == {b.pid}
    finally:
        one.terminate()
        two.terminate()


async def test_a_backend_that_outlives_sigterm_is_failed_not_terminated(
    pg: TempCluster, admin: asyncpg.Connection, watchdog_conn: Any
) -> None:
    """A stopped backend keeps its SIGTERM pending: the pairwise confirmation still sees it."""
    stuck = await app_session(pg, "victim-stuck")
    fine = await app_session(pg, "victim-fine")
    stuck_pid = stuck.get_server_pid()
    try:
        batch = [await session_of(watchdog_conn, stuck), await session_of(watchdog_conn, fine)]
        os.kill(stuck_pid, signal.SIGSTOP)
        try:
            outcomes = await execute(watchdog_conn, [action(s, "terminate") for s in batch])
        finally:
            os.kill(stuck_pid, signal.SIGCONT)
        assert [o.outcome for o in outcomes] == ["failed", "terminated"]
        assert "still running" in (outcomes[0].error or "")

        async def exited() -> bool:
            return not await alive(admin, stuck_pid)

        await wait_for(exited, what="the stopped backend's exit once continued")
    finally:
        stuck.terminate()
        fine.terminate()

