"""Who a session says it is against who it is, on a real server.

A client chooses its application_name: calling itself pg-watchdog must buy no immunity. Another
watchdog instance is recognised by that name and the watchdog's own role together. And
``exclude.superusers`` judges the login role (pg_stat_activity.usename stays the session user
after SET ROLE): the README's ``member_of: [..., postgres]`` spares a DBA who switched to
postgres.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from daemon import Daemon, backend_alive
from helpers import connect, wait_for
from scenario import WATCHDOG_ROLE, kill_leftovers, read_audit, run_cli, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import PROVIDER_ADMIN_ROLES

THRESHOLD = 0.3


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    pg.psql("CREATE ROLE dba LOGIN; GRANT postgres TO dba;")
    return pg


@pytest.fixture
async def opened(cluster: TempCluster) -> AsyncIterator[list[asyncpg.Connection]]:
    kill_leftovers(cluster)
    conns: list[asyncpg.Connection] = []
    yield conns
    for c in conns:
        c.terminate()


def write_config(path: Path, cluster: TempCluster, *, audit: Path, interval: str = "30s",
                 exclude: dict[str, Any] | None = None, idle: str = f"{THRESHOLD}s") -> Path:
    """Every idle session past ``idle``, whatever its role: only exclusions spare one."""
    doc: dict[str, Any] = {
        "targets": [{"name": "main", "dsn": cluster.dsn(WATCHDOG_ROLE), "interval": interval}],
        "policies": [{"name": "idle", "state": "idle", "longer_than": idle}],
        "audit": {"path": str(audit)},
    }
    if exclude is not None:
        doc["exclude"] = exclude
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


async def idle_for(admin: asyncpg.Connection, pid: int, seconds: float) -> bool:
    age = await admin.fetchval(
        "SELECT extract(epoch FROM now() - state_change) FROM pg_stat_activity"
        " WHERE pid = $1 AND state = 'idle'", pid)
    return age is not None and float(age) > seconds


async def test_impostor_is_killed_and_another_instance_spared(
    cluster: TempCluster, opened: list[asyncpg.Connection], tmp_path: Path
) -> None:
    admin = await connect(cluster, "postgres", "psql")
    opened.append(admin)
    # A second real instance: dry run (it acts on nothing), its monitoring connection idle
    # between its sweeps, one a minute (nothing near its threshold brings one sooner).
    other = write_config(tmp_path / "other.yaml", cluster, audit=tmp_path / "other.jsonl",
                         interval="60s", idle="1h")
    with Daemon(other, None, "--dry-run") as daemon:
        async def instance_pid() -> int | None:
            return await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-watchdog'"
                " AND usename = $1", WATCHDOG_ROLE)

        await wait_for(instance_pid, timeout=30, what="the other instance's connection")
        other_pid = await instance_pid()
        assert other_pid is not None
        impostor = await connect(cluster, "app", "pg-watchdog")
        opened.append(impostor)
        await impostor.execute("SELECT 1")
        impostor_pid = impostor.get_server_pid()
        await wait_for(lambda: idle_for(admin, other_pid, THRESHOLD + 0.2), timeout=30,
                       what="the other instance to sit idle past the threshold")
        await wait_for(lambda: idle_for(admin, impostor_pid, THRESHOLD), timeout=10,
                       what="the impostor to sit idle past the threshold")

        audit = tmp_path / "audit.jsonl"
        config = write_config(tmp_path / "p.yaml", cluster, audit=audit)
        explain = await run_cli("status", "--json", "--explain", "-c", config)
        verdicts = {s["pid"]: s["reason"] for s in explain.json()["targets"][0]["explain"]}
        assert "another pg-watchdog instance" not in verdicts[impostor_pid]
        assert verdicts[other_pid] == "another pg-watchdog instance (same role)"

        once = await run_cli("once", "-c", config)
        assert once.rc == 0, once.stderr
        assert {r["pid"]: r["outcome"] for r in read_audit(audit)} == {
            impostor_pid: "terminated"
        }
        assert await backend_alive(cluster, other_pid)
        assert daemon.alive()
        assert daemon.stop() == 0


async def test_set_role_to_a_superuser_is_spared_by_member_of(
    cluster: TempCluster, opened: list[asyncpg.Connection], tmp_path: Path
) -> None:
    admin = await connect(cluster, "postgres", "psql")
    opened.append(admin)
    sessions: dict[str, int] = {}
    for name in ("dba-shipped", "dba-member-of"):
        dba = await connect(cluster, "dba", name)
        opened.append(dba)
        await dba.execute("SET ROLE postgres")
        assert await dba.fetchval("SELECT current_user") == "postgres"
        sessions[name] = dba.get_server_pid()
    seen = await admin.fetch("SELECT pid, usename FROM pg_stat_activity WHERE pid = ANY($1)",
                             list(sessions.values()))
    assert {r["usename"] for r in seen} == {"dba"}  # the session user, not postgres
    await asyncio.sleep(THRESHOLD + 0.2)

    # The shipped exclusions judge the login role dba, no superuser: it is killed.
    shipped = tmp_path / "shipped.jsonl"
    config = write_config(tmp_path / "shipped.yaml", cluster, audit=shipped, exclude={
        "superusers": True, "applications": ["psql", "dba-member-of"]})
    assert (await run_cli("once", "-c", config)).rc == 0
    assert [r["pid"] for r in read_audit(shipped)] == [sessions["dba-shipped"]]

    # The README's configuration: members of postgres are spared too.
    audit = tmp_path / "audit.jsonl"
    member_of = [*PROVIDER_ADMIN_ROLES, "postgres"]
    config = write_config(tmp_path / "p.yaml", cluster, audit=audit, exclude={
        "superusers": True, "applications": ["psql"], "member_of": member_of})
    victim = await connect(cluster, "app", "leaky")
    opened.append(victim)
    await victim.execute("SELECT 1")
    await asyncio.sleep(THRESHOLD + 0.2)
    explain = await run_cli("status", "--json", "--explain", "-c", config)
    verdicts = {s["pid"]: s["reason"] for s in explain.json()["targets"][0]["explain"]}
    assert verdicts[sessions["dba-member-of"]] == "member of postgres"
    once = await run_cli("once", "-c", config)
    assert once.rc == 0, once.stderr
    # The sweep ran (the leaky session is killed) and spared the DBA.
    assert [r["pid"] for r in read_audit(audit)] == [victim.get_server_pid()]
    assert await backend_alive(cluster, sessions["dba-member-of"])
