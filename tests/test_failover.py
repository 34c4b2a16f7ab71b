"""Failover when the leader's network dies silently, with real `pg-watchdog run` processes.

The server listens on 127.0.0.1-3; instance A connects through 127.0.0.2, B through
127.0.0.3, the victims through 127.0.0.1. iptables DROP rules silence A's whole address:
the server must drop A's backend (and the leader lock with it) by its keepalives, so B
takes over; when the network comes back A acts only if it wins the lock again. The
failover time is measured by bench/failover.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import MAJORS, MakeCluster
from daemon import Daemon, audit_records, backend_alive, write_config
from helpers import connect, wait_for
from partition import FOLLOWER_ADDR, LEADER_ADDR, LISTEN, Partition, allow_loopback, dsn_via
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster

FINAL = {"terminated", "gone", "failed", "unconfirmed"}


@pytest.fixture
def partition() -> Iterator[Partition]:
    with Partition(LEADER_ADDR) as part:  # healed in a finally, whatever the test did
        yield part


async def _victim(cluster: TempCluster) -> tuple[asyncpg.Connection, int]:
    conn = await connect(cluster, "app", application_name="leaky")
    return conn, await conn.fetchval("SELECT pg_backend_pid()")


async def _dies(cluster: TempCluster, pid: int, timeout: float) -> None:
    async def gone() -> bool:
        return not await backend_alive(cluster, pid)

    await wait_for(gone, timeout=timeout, interval=0.2, what=f"backend {pid} to be terminated")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
async def test_follower_takes_over_from_a_partitioned_leader(
    major: int, make_cluster: MakeCluster, partition: Partition, tmp_path: Path
) -> None:
    c = make_cluster(major, settings=LISTEN)
    allow_loopback(c)
    setup_roles(c)
    a_log, b_log = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    cfg_a = write_config(tmp_path / "a.yaml", c, audit=a_log, dsn=dsn_via(c, LEADER_ADDR))
    cfg_b = write_config(tmp_path / "b.yaml", c, audit=b_log, dsn=dsn_via(c, FOLLOWER_ADDR))
    with Daemon(cfg_a) as a:
        await wait_for(lambda: "this instance acts" in a.log(), timeout=30, what="a leads")
        with Daemon(cfg_b) as b:
            await wait_for(lambda: "observing" in b.log(), timeout=30, what="b observes")
            conn, first = await _victim(c)
            await _dies(c, first, timeout=30)
            await wait_for(lambda: audit_records(a_log), timeout=30, what="a's record")
            assert [r["watchdog_pid"] for r in audit_records(a_log)] == [a.pid]
            before_cut = len(audit_records(a_log))

            partition.cut()
            try:
                conn2, second = await _victim(c)
                # Without keepalives on A's session the server keeps A's backend and its
                # lock for hours, and this times out.
                await _dies(c, second, timeout=90)
                await wait_for(
                    lambda: any(r["pid"] == second for r in audit_records(b_log)),
                    timeout=30,
                    what="b's record",
                )
                by_b = [r for r in audit_records(b_log) if r["pid"] == second]
                assert [(r["outcome"], r["watchdog_pid"]) for r in by_b] == [("terminated", b.pid)]
                # A notices on its own schedule (its sweep's timeout), not before B acts.
                await wait_for(
                    lambda: "lost the leader lock" in a.log() or "timed out" in a.log(),
                    timeout=60,
                    what="a to notice the cut",
                )
                cut_at = len(a.log())
            finally:
                partition.heal()

            # A comes back on a new connection and must find the lock taken.
            await wait_for(
                lambda: "observing" in a.log()[cut_at:], timeout=90, what="a observes again"
            )
            conn3, third = await _victim(c)
            await _dies(c, third, timeout=30)
            assert b.alive() and a.alive()
            assert b.stop() == 0
        assert a.stop() == 0
    for cn in (conn, conn2, conn3):
        cn.terminate()

    assert len(audit_records(a_log)) == before_cut, "A recorded something after the cut"
    finals = Counter(
        r["pid"] for r in audit_records(a_log) + audit_records(b_log) if r["outcome"] in FINAL
    )
    assert finals == {first: 1, second: 1, third: 1}, finals
