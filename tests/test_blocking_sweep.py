"""`blocking: true` on real servers: the session others wait on is terminated, an equally old
one that blocks nobody falls through to the next policy, and the waiters then proceed.

Two shapes: two rows with one waiter each (both waiters name the holder), and one row with
two waiters queued behind each other (the second names the first, not the holder).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import connect, wait_for
from scenario import APP_ROLE, is_alive, policy_file, read_audit, run_cli

from watchdog.commands.demo.tempcluster import TempCluster

IIT = ["idle in transaction", "idle in transaction (aborted)"]
SHAPES = {
    # waiter -> the row it updates
    "two_rows_one_waiter_each": (1, 2),
    "one_row_two_waiters_queued": (1, 1),
}


@pytest.fixture
async def table(pg: TempCluster, admin: asyncpg.Connection) -> AsyncIterator[None]:
    await admin.execute(
        "DROP TABLE IF EXISTS held; CREATE TABLE held (id int PRIMARY KEY, v int);"
        "INSERT INTO held VALUES (1, 0), (2, 0); GRANT ALL ON held TO app"
    )
    yield


def blocking_config(tmp_path: Path, pg: TempCluster, **blocking: Any) -> Path:
    policies = [
        {"name": "blockers", "state": IIT, "longer_than": "1s", "blocking": True, **blocking},
        {"name": "idle-in-transaction", "state": IIT, "longer_than": "1h"},
    ]
    return policy_file(tmp_path, pg, extra={"policies": policies})


async def lock_waits(admin: asyncpg.Connection) -> int:
    return int(await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND usename = 'app'"))


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("wait", [None, "200ms"], ids=["blocking", "blocking_longer_than"])
async def test_the_blocker_is_terminated_and_the_bystander_falls_through(
    pg: TempCluster, admin: asyncpg.Connection, table: None, tmp_path: Path, shape: str,
    wait: str | None,
) -> None:
    config = blocking_config(tmp_path, pg, **({"blocking_longer_than": wait} if wait else {}))
    blocker = await connect(pg, APP_ROLE, "holder")
    bystander = await connect(pg, APP_ROLE, "bystander")
    waiters = [await connect(pg, APP_ROLE, f"waiter-{i}") for i in range(2)]
    tasks: list[asyncio.Task[Any]] = []
    try:
        # Equally old: both open their transactions together; only one holds row locks.
        await asyncio.gather(blocker.execute("BEGIN"), bystander.execute("BEGIN"))
        await asyncio.gather(
            blocker.execute("UPDATE held SET v = v + 1 WHERE id IN (1, 2)"),
            bystander.execute("SELECT count(*) FROM held"),
        )
        for conn, row in zip(waiters, SHAPES[shape], strict=True):
            tasks.append(asyncio.create_task(
                conn.execute("UPDATE held SET v = v + 10 WHERE id = $1", row)))
            # In order, so the second queues behind the first on one row.
            n = len(tasks)
            await wait_for(lambda n=n: _waits_at_least(admin, n), 20, what=f"{n} lock waiters")
        blocker_pid = blocker.get_server_pid()
        bystander_pid = bystander.get_server_pid()

        async def swept() -> bool:
            res = await run_cli("once", "-c", config, "--json")
            assert res.rc == 0, (res.stdout, res.stderr)
            return bool(res.json()["targets"][0]["actions"])

        # Polled: the blocker must be past 1s and waited on past the wait threshold.
        await wait_for(swept, 60, interval=0.3, what="a sweep that acts")
        [rec] = read_audit(tmp_path / "audit.jsonl")
        assert (rec["pid"], rec["policy"], rec["outcome"]) == (blocker_pid, "blockers",
                                                              "terminated")
        assert rec["blocking"]["sessions"] == 2, rec["blocking"]
        assert rec["blocking"]["longest_wait_s"] > 0
        assert "xmin_age" in rec  # null: read committed and idle, it holds no snapshot
        # The waiters proceed now that the holder is gone.
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert await is_alive(bystander), "the bystander blocks nobody and is not yet due"
        res = await run_cli("status", "-c", config, "--explain", "--json")
        [report] = res.json()["targets"]
        [seen] = [r for r in report["explain"] if r["pid"] == bystander_pid]
        assert seen["policy"] == "idle-in-transaction" and not seen["acting"], seen
        assert "blockers: blocks nobody" in seen["reason"], seen
    finally:
        for t in tasks:
            t.cancel()
        for conn in (blocker, bystander, *waiters):
            conn.terminate()


async def _waits_at_least(admin: asyncpg.Connection, n: int) -> bool:
    return await lock_waits(admin) >= n


async def test_status_explain_shows_who_blocks_and_the_xmin_holders(
    pg: TempCluster, admin: asyncpg.Connection, table: None, tmp_path: Path
) -> None:
    config = blocking_config(tmp_path, pg)
    blocker = await connect(pg, APP_ROLE, "holder")
    waiters = [await connect(pg, APP_ROLE, f"waiter-{i}") for i in range(3)]
    tasks: list[asyncio.Task[Any]] = []
    try:
        await blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await blocker.execute("UPDATE held SET v = v + 1 WHERE id = 1")
        for conn in waiters:
            tasks.append(asyncio.create_task(conn.execute("UPDATE held SET v = 0 WHERE id = 1")))
        await wait_for(lambda: _waits_at_least(admin, 3), 20, what="3 lock waiters")
        res = await run_cli("status", "-c", config, "--explain")
        assert res.rc == 0, res.stderr
        assert "blocks 3 sessions (longest " in res.stdout, res.stdout
        assert "xmin held    pid " in res.stdout, res.stdout
        res = await run_cli("status", "-c", config, "--json")
        [report] = res.json()["targets"]
        pids = [h["pid"] for h in report["holding_back_vacuum"]]
        assert blocker.get_server_pid() in pids, report["holding_back_vacuum"]
    finally:
        for t in tasks:
            t.cancel()
        for conn in (blocker, *waiters):
            conn.terminate()
