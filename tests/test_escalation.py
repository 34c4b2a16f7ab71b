"""Self-healing escalation against a real, small server: a policy with
``when: {connections_above: 50%}`` acts while the server is above half full, and not below.
Fullness is the server's own count: client backends / (max_connections - reserved slots)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import MAJORS, MakeCluster
from helpers import connect

from watchdog.audit.log import AuditLog
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import load_config
from watchdog.core.decide import decide
from watchdog.pg.connect import connect as watchdog_connect
from watchdog.pg.connect import server_address
from watchdog.service.sweep import SweepReport, sweep_target

MAX_CONNECTIONS = 12


def _config(pg: TempCluster, tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(
        f"""
targets:
  - name: main
    dsn: {pg.dsn()}
policies:
  - name: idle-when-full
    state: idle
    longer_than: 300ms
    when: {{connections_above: 50%}}
  - name: idle
    state: idle
    longer_than: 1h
limits:
  max_per_sweep: 100
audit:
  path: {tmp_path / "audit.jsonl"}
"""
    )
    return path


async def _server_count(admin: asyncpg.Connection) -> tuple[int, int]:
    """(client backends, slots for ordinary roles) as the server itself reports them."""
    row = await admin.fetchrow(
        """
        SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')
                   AS used,
               current_setting('max_connections')::int
               - current_setting('superuser_reserved_connections')::int
               - coalesce(current_setting('reserved_connections', true), '0')::int AS capacity
        """
    )
    assert row is not None
    return row["used"], row["capacity"]


async def _open_idle(pg: TempCluster, n: int) -> list[asyncpg.Connection]:
    conns = []
    for _ in range(n):
        conn = await connect(pg, "app", application_name="idler")
        await conn.execute("SELECT 1")
        conns.append(conn)
    return conns


@pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
async def test_escalation_acts_above_its_fullness_and_not_below(
    major: int, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    settings = {"reserved_connections": "2"} if major >= 16 else {}
    pg = make_cluster(major, max_connections=MAX_CONNECTIONS, settings=settings)
    pg.psql("CREATE ROLE app LOGIN")
    config = load_config(str(_config(pg, tmp_path)))
    target = config.targets[0]
    audit = AuditLog(config.audit.path)
    watcher = await watchdog_connect(target)
    admin = await connect(pg, application_name="test-admin")
    server = await server_address(watcher)
    conns: list[Any] = []

    async def sweep() -> SweepReport:
        return await sweep_target(watcher, server, config, target, audit)

    try:
        # 15: 12 - 3 = 9 ordinary slots; 16+: 12 - 3 - 2 = 7. The watcher and admin count too.
        _, capacity = await _server_count(admin)
        below = capacity // 2 - 2  # idle sessions that keep the server at or under 50%
        conns = await _open_idle(pg, below)
        used, _ = await _server_count(admin)
        assert used / capacity <= 0.5
        await asyncio.sleep(0.5)  # every idler is past 300 ms
        report = await sweep()
        assert (report.snapshot.used, report.snapshot.capacity) == (used, capacity)
        assert report.outcomes == []
        # Sweeps skip the explanations; status --explain asks for them on the same snapshot.
        explained = decide(report.snapshot, config, target.name).verdicts
        idlers = [v for v in explained if v.session.application_name == "idler"]
        assert len(idlers) == below
        # The escalation sleeps; the regular 1 h policy is the one that will act, later.
        assert {(v.policy, v.acting) for v in idlers} == {("idle", False)}

        conns += await _open_idle(pg, 2)  # now above half full
        used, _ = await _server_count(admin)
        assert used / capacity > 0.5
        await asyncio.sleep(0.5)
        report = await sweep()
        assert report.snapshot.used == used
        assert report.snapshot.saturation == used / capacity
        outcomes = {o.action.session.pid: o for o in report.outcomes}
        assert {o.outcome for o in outcomes.values()} == {"terminated"}
        assert {o.action.policy for o in outcomes.values()} == {"idle-when-full"}
        assert len(outcomes) == below + 2
        pids = [c.get_server_pid() for c in conns]
        assert sorted(outcomes) == sorted(pids)
        gone = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids
        )
        assert gone == 0

        # Back below: new idlers past the threshold are left alone again.
        conns += await _open_idle(pg, 1)
        await asyncio.sleep(0.5)
        used, _ = await _server_count(admin)
        assert used / capacity <= 0.5
        report = await sweep()
        assert report.outcomes == []
    finally:
        for conn in [*conns, admin]:
            conn.terminate()
        await watcher.close()
