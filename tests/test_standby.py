"""A target that is a hot standby: a real primary and a real streaming standby made by
pg_basebackup. Sweeps, exclusions, escalation and leadership work there as on a primary, and
`status` and `check --connect` say the server is a standby."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from daemon import Daemon, audit_records
from helpers import connect, wait_for
from scenario import REPO, WATCHDOG_ROLE, is_alive, policy_file, read_audit, run_cli, setup_roles

from watchdog.commands.demo.tempcluster import ClusterError, TempCluster, start_standby

IDLE = 2.0


@pytest.fixture(scope="module")
def standby(pg: TempCluster) -> Iterator[TempCluster]:
    """A hot standby of the module's cluster; the roles come to it by replication."""
    setup_roles(pg)
    pg.psql(
        "SELECT 'CREATE ROLE rds_superuser NOLOGIN' WHERE NOT EXISTS"
        " (SELECT FROM pg_roles WHERE rolname = 'rds_superuser') \\gexec\n"
        "SELECT 'CREATE ROLE dba LOGIN IN ROLE rds_superuser' WHERE NOT EXISTS"
        " (SELECT FROM pg_roles WHERE rolname = 'dba') \\gexec"
    )
    try:
        replica = start_standby(pg)
    except ClusterError as exc:
        pytest.fail(f"standby of PostgreSQL {pg.major} did not start: {exc}", pytrace=False)
    try:
        yield replica
    finally:
        replica.cleanup()


@pytest.fixture
async def on_standby(standby: TempCluster) -> AsyncIterator[dict[str, asyncpg.Connection]]:
    """Sessions on the standby: app idle, app active in pg_sleep, dba (rds_superuser) idle."""
    conns = {
        "idle": await connect(standby, "app", "reporting-ui"),
        "active": await connect(standby, "app", "reporting-batch"),
        "dba": await connect(standby, "dba", "DBeaver 24.1"),
    }
    for name in ("idle", "dba"):
        await conns[name].execute("SELECT 1")
    sleeping = asyncio.create_task(conns["active"].fetchval("SELECT pg_sleep(120)"))
    try:
        yield conns
    finally:
        sleeping.cancel()
        await asyncio.gather(sleeping, return_exceptions=True)
        for conn in conns.values():
            conn.terminate()


def shipped_exclude() -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "policies" / "default.yaml").read_text(encoding="utf-8"))
    exclude: dict[str, Any] = doc["exclude"]
    return exclude


def standby_policy(tmp_path: Path, standby: TempCluster, interval: str = "30s",
                   name: str = "policies.yaml") -> Path:
    # The escalation rule first: on a server this empty it acts at once (above 1%).
    escalation = {"name": "idle-when-full", "state": "idle", "longer_than": f"{IDLE:g}s",
                  "when": {"connections_above": "1%"}}
    idle = {"name": "idle", "state": "idle", "longer_than": "10m"}
    extra = {
        "targets": [{"name": "replica", "dsn": standby.dsn(WATCHDOG_ROLE), "interval": interval}],
        "exclude": shipped_exclude(),
        "policies": [escalation, idle],
        "audit": {"path": str(tmp_path / f"{name}.audit.jsonl"), "query": "truncate"},
    }
    return policy_file(tmp_path, standby, name=name, extra=extra)


async def idle_past(standby: TempCluster, conns: dict[str, asyncpg.Connection]) -> None:
    watcher = await connect(standby, "postgres", "psql")
    pids = [conns[n].get_server_pid() for n in ("idle", "dba")]
    try:
        async def ready() -> bool:
            rows = await watcher.fetch(
                "SELECT state, now() - state_change > make_interval(secs => $2) AS old"
                " FROM pg_stat_activity WHERE pid = ANY($1) OR pid = $3", pids, IDLE + 0.3,
                conns["active"].get_server_pid())
            return len(rows) == 3 and all(r["old"] or r["state"] == "active" for r in rows)

        await wait_for(ready, timeout=30, what="standby sessions idle past the threshold")
    finally:
        await watcher.close()


async def test_standby_is_swept_idle_killed_active_and_excluded_spared(
    standby: TempCluster, on_standby: dict[str, asyncpg.Connection], tmp_path: Path,
) -> None:
    assert standby.psql("SELECT pg_is_in_recovery()") == "t"
    config = standby_policy(tmp_path, standby)
    await idle_past(standby, on_standby)

    status = await run_cli("status", "-c", config, "--json")
    assert status.rc == 0, status.stderr
    report = status.json()["targets"][0]
    assert (report["role"], report["in_recovery"]) == ("standby", True)
    text = await run_cli("status", "-c", config)
    assert text.rc == 0, text.stderr
    assert "hot standby (in recovery)" in text.stdout.splitlines()[0], text.stdout

    once = await run_cli("once", "-c", config)
    assert once.rc == 0, once.stderr
    records = read_audit(tmp_path / "policies.yaml.audit.jsonl")
    assert [(r["pid"], r["policy"], r["outcome"]) for r in records] == [
        (on_standby["idle"].get_server_pid(), "idle-when-full", "terminated")], records
    assert not await is_alive(on_standby["idle"])
    assert await is_alive(on_standby["dba"])  # member of rds_superuser, on a standby too
    watcher = await connect(standby, "postgres", "psql")
    try:
        state = await watcher.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1",
                                       on_standby["active"].get_server_pid())
    finally:
        await watcher.close()
    assert state == "active"


async def test_check_connect_says_standby(standby: TempCluster, tmp_path: Path) -> None:
    res = await run_cli("check", "--connect", "-c", standby_policy(tmp_path, standby))
    assert res.rc == 0, (res.stdout, res.stderr)
    assert ("  ok    server is a hot standby (in recovery): sweeps and leadership work there"
            " as on a primary") in res.stdout.splitlines(), res.stdout


async def test_two_services_on_a_standby_one_leads_and_acts(
    standby: TempCluster, tmp_path: Path,
) -> None:
    # pg_try_advisory_lock works in recovery: exactly one instance leads.
    cfg_a = standby_policy(tmp_path, standby, interval="1s", name="a.yaml")
    cfg_b = standby_policy(tmp_path, standby, interval="1s", name="b.yaml")
    with Daemon(cfg_a) as a:
        await wait_for(lambda: "this instance acts" in a.log(), timeout=30, what="a leads")
        with Daemon(cfg_b) as b:
            await wait_for(lambda: "observing" in b.log(), timeout=30, what="b observes")
            victim = await connect(standby, "app", "reporting-ui")
            try:
                await victim.execute("SELECT 1")
                pid = victim.get_server_pid()

                def recorded() -> bool:
                    return bool(audit_records(tmp_path / "a.yaml.audit.jsonl"))

                await wait_for(recorded, timeout=30, what="the leader to terminate the victim")
            finally:
                victim.terminate()
            records = audit_records(tmp_path / "a.yaml.audit.jsonl")
            assert [(r["pid"], r["outcome"], r["watchdog_pid"]) for r in records] == [
                (pid, "terminated", a.pid)]
            assert audit_records(tmp_path / "b.yaml.audit.jsonl") == []
            assert b.stop() == 0
        assert a.stop() == 0
