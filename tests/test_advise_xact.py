"""Long transactions that never idle: `advise` prints the fix that would have acted, on every major.

Role ``busy`` keeps transactions open by sending a small query every 500 ms, so it is never idle
long; a policy measured from xact_start (2 s) ends them, for real, through `pg-watchdog once`
(the sweep's race check spares a session whose state changed between look and act, so the
pause between queries leaves it room).
An idle_in_transaction_session_timeout would never have fired for them, so advise must not
print one. On 17+ it prints ``ALTER ROLE busy SET transaction_timeout``, and once applied, the
server ends the next such session itself; on 15 and 16 it prints a policy, and that policy,
pasted into a policy file, ends the next such session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from helpers import connect, wait_for
from scenario import policy_file, read_audit, run_cli, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster

ROLE = "busy"
LONG_XACT = {
    "name": "long-xact", "state": ["idle in transaction", "active"],
    "measured_from": "xact_start", "longer_than": "2s", "action": "terminate",
}


@contextlib.asynccontextmanager
async def busy_sessions(pg: TempCluster, n: int) -> AsyncIterator[list[asyncio.Task[None]]]:
    """``n`` sessions of ROLE, each in one transaction sending SELECT 1 every 500 ms; the tasks
    end when their session does."""
    conns = [await connect(pg, ROLE, "busy-worker") for _ in range(n)]

    async def work(conn: asyncpg.Connection) -> None:
        await conn.execute("BEGIN")
        while True:
            await conn.execute("SELECT 1")
            await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(work(c)) for c in conns]
    try:
        yield tasks
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            c.terminate()


async def kill_until(config: Path, audit: Path, n: int) -> list[dict[str, Any]]:
    async def killed() -> bool:
        res = await run_cli("once", "-c", config)
        assert res.rc == 0, res.stderr
        return sum(r["outcome"] == "terminated" for r in read_audit(audit)) >= n

    await wait_for(killed, 60, interval=0.3, what=f"{n} busy sessions terminated")
    return read_audit(audit)


async def test_long_transactions_get_transaction_timeout_or_a_policy_never_an_idle_timeout(
    pg: TempCluster, tmp_path: Path
) -> None:
    setup_roles(pg)
    pg.psql(f"DROP ROLE IF EXISTS {ROLE}; CREATE ROLE {ROLE} LOGIN")
    audit = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path, pg, audit_path=audit, idle="1h", idle_in_transaction="5s")
    doc = yaml.safe_load(config.read_text())
    doc["policies"].insert(0, LONG_XACT)  # the first matching policy claims a session
    config.write_text(yaml.safe_dump(doc))
    async with busy_sessions(pg, 6):
        records = await kill_until(config, audit, 6)
    assert {r["policy"] for r in records} == {"long-xact"}, records
    res = await run_cli("advise", "-c", config, "--json")
    assert res.rc == 0, res.stderr
    findings = res.json()["findings"]
    assert not any("idle_in_transaction_session_timeout" in x for f in findings for x in f["fix"])
    assert "idle_in_transaction_timeout" not in {f["id"] for f in findings}
    [tt] = [f for f in findings if f["id"] == "transaction_timeout"]
    assert tt["subject"] == f"role {ROLE}"
    if pg.major >= 17:
        await _transaction_timeout_acts(pg, config, tt)
    else:
        await _policy_acts(pg, tmp_path, tt)


async def _transaction_timeout_acts(pg: TempCluster, config: Path, tt: dict[str, Any]) -> None:
    assert tt["fix"][0] == f"ALTER ROLE {ROLE} SET transaction_timeout = '2s';", tt["fix"]
    assert any("Prepared transactions" in x and "exempt" in x for x in tt["fix"])
    pg.psql(tt["fix"][0])
    try:
        # No watchdog runs now: the server itself ends the next busy transaction.
        async with busy_sessions(pg, 1) as [task]:
            await wait_for(task.done, 30, interval=0.2, what="transaction_timeout to end it")
            # Its connection ended under it: asyncpg says so in more than one way (a closed
            # connection, or an internal state error when the close lands mid-query).
            assert isinstance(
                task.exception(), asyncpg.InterfaceError | asyncpg.InternalClientError | OSError
            ), task
        log = pg.log_path.read_text(errors="replace")
        assert "terminating connection due to transaction timeout" in log
        res = await run_cli("advise", "-c", config, "--json")
        assert "transaction_timeout" not in {f["id"] for f in res.json()["findings"]}
    finally:
        pg.psql(f"ALTER ROLE {ROLE} RESET ALL")


async def _policy_acts(pg: TempCluster, tmp_path: Path, tt: dict[str, Any]) -> None:
    assert not any(x.startswith("ALTER ROLE") for x in tt["fix"]), tt["fix"]
    assert f"PostgreSQL {pg.major} has no transaction_timeout" in tt["fix"][0]
    [policy] = yaml.safe_load("\n".join(x for x in tt["fix"] if x.startswith("  ")))
    audit = tmp_path / "pasted.jsonl"
    config = policy_file(tmp_path, pg, audit_path=audit, name="pasted.yaml")
    doc = yaml.safe_load(config.read_text())
    doc["policies"] = [policy]
    config.write_text(yaml.safe_dump(doc))
    async with busy_sessions(pg, 2):
        records = await kill_until(config, audit, 2)
    assert {r["policy"] for r in records} == {policy["name"]}
    assert {r["usename"] for r in records} == {ROLE}
