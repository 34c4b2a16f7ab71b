"""Every SQL statement `advise` prints changes what it says, and nothing else, on a real server.

Roles whose names are keywords (``all``, ``current_user``), need case kept (``User``), hold a
space or double quotes are each killed for idle in transaction by real `pg-watchdog once`
sweeps, in a database named ``table``; advise then prints ``ALTER ROLE ... SET`` fixes for
them. Each printed statement is run in a transaction that is rolled back: pg_db_role_setting
must show that role's setting changed and no other row touched (unquoted, ``ALTER ROLE all``
sets it for every role, superusers included, and ``current_user`` for whoever runs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import connect, wait_for
from scenario import policy_file, read_audit, run_cli, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster

ROLES = ["all", "current_user", "User", "with space", '"quoted"']
DATABASE = "table"
SETTINGS = """
SELECT coalesce(r.rolname, '(every role)') AS role, coalesce(d.datname, '(every database)') AS db,
       s.setconfig
FROM pg_db_role_setting s
LEFT JOIN pg_roles r ON r.oid = s.setrole
LEFT JOIN pg_database d ON d.oid = s.setdatabase
"""


@pytest.fixture(scope="module")
def server(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    # The module's own cluster: the names are ROLES, written out as quoted identifiers.
    pg.psql('CREATE ROLE "all" LOGIN; CREATE ROLE "current_user" LOGIN; CREATE ROLE "User" LOGIN;'
            ' CREATE ROLE "with space" LOGIN; CREATE ROLE """quoted""" LOGIN;'
            ' CREATE DATABASE "table";')
    # Something to tell apart from the change: existing rows must stay as they are.
    pg.psql("ALTER ROLE watchdog SET work_mem = '8MB'")
    return pg


async def settings(conn: Any) -> set[tuple[str, str, tuple[str, ...]]]:
    return {(r["role"], r["db"], tuple(r["setconfig"])) for r in await conn.fetch(SETTINGS)}


async def kill_five(server: TempCluster, role: str, config: Path, audit: Path) -> None:
    """Five sessions of ``role`` left idle in transaction, each ended by a real `once`."""
    conns = [await connect(server, role, "leaky-app", database=DATABASE) for _ in range(5)]
    for conn in conns:
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")

    async def all_killed() -> bool:
        res = await run_cli("once", "-c", config)
        assert res.rc == 0, res.stderr
        return sum(r["outcome"] == "terminated" for r in read_audit(audit)) >= 5

    try:
        await wait_for(all_killed, 60, interval=0.3, what=f"5 sessions of {role!r} terminated")
    finally:
        for conn in conns:
            conn.terminate()
    assert {r["usename"] for r in read_audit(audit)} == {role}


@pytest.mark.parametrize("role", ROLES)
async def test_printed_alter_role_changes_only_that_role(
    server: TempCluster, tmp_path: Path, role: str
) -> None:
    audit = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path, server, audit_path=audit, idle="1h",
                         idle_in_transaction="500ms")
    await kill_five(server, role, config, audit)
    res = await run_cli("advise", "-c", config, "--json")
    assert res.rc == 0, res.stderr
    [finding] = [f for f in res.json()["findings"] if f["id"] == "idle_in_transaction_timeout"]
    assert finding["subject"] == f"role {role}"
    everywhere = finding["fix"][0]
    [in_db] = [x.split(": ", 1)[1] for x in finding["fix"] if x.startswith("or only in that")]
    assert everywhere.startswith("ALTER ROLE ") and " IN DATABASE " in in_db, finding["fix"]

    admin = await connect(server, database=DATABASE)
    try:
        oid = await admin.fetchval("SELECT oid FROM pg_roles WHERE rolname = $1", role)
        before = await settings(admin)
        for statement, db in ((everywhere, "(every database)"), (in_db, DATABASE)):
            tx = admin.transaction()
            await tx.start()
            try:
                await admin.execute(statement)
                after = await settings(admin)
                changed = await admin.fetchval(
                    "SELECT setconfig FROM pg_db_role_setting WHERE setrole = $1"
                    " AND setdatabase = (SELECT coalesce(max(oid), 0) FROM pg_database"
                    " WHERE datname = $2)", oid, None if db.startswith("(") else db)
            finally:
                await tx.rollback()
            assert after - before == {(role, db, ("idle_in_transaction_session_timeout=500ms",))}
            assert before - after == set(), statement
            assert changed == ["idle_in_transaction_session_timeout=500ms"], statement
        assert await settings(admin) == before
    finally:
        await admin.close()
