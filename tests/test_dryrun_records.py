"""A dry run cannot fill the disk: each due session is recorded once per policy, not once
per sweep, and `audit --summary` counts sessions. Real server, real `pg-watchdog run`."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
from helpers import connect, sweeps_ran, wait_for
from scenario import (
    WATCHDOG_ROLE,
    backends,
    idle_app_session,
    is_alive,
    policy_file,
    read_audit,
    run_cli,
    start_service,
    stop_process,
)

from watchdog.audit.log import AuditLog
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import load_config
from watchdog.service.sweep import sweep_target


async def test_dry_run_service_records_each_due_session_once(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path, pg, audit_path=audit, idle="1s", idle_in_transaction="1s",
                         interval="1s", dry_run=True)
    conns = [await idle_app_session(pg, f"leak-{i}") for i in range(2)]
    iit = await connect(pg, "app", "leak-iit")
    await iit.execute("BEGIN; SELECT 1")
    conns.append(iit)
    log = tmp_path / "run.log"
    proc = await start_service(config, log)
    try:
        pids = {c.get_server_pid() for c in conns}

        def recorded() -> set[int]:
            return {r["pid"] for r in read_audit(audit)}

        await wait_for(lambda: pids <= recorded(), 15, what="a record for each leaked session")
        await sweeps_ran(pg, 5)  # five more sweeps see the same sessions due
        late = await idle_app_session(pg, "leak-late")  # one that leaks later is recorded too
        conns.append(late)
        pids.add(late.get_server_pid())
        await wait_for(lambda: pids <= recorded(), 15, what="a record for the late one")
        await sweeps_ran(pg, 3)
        assert proc.returncode is None, log.read_text()

        records = read_audit(audit)
        per_session = Counter((r["pid"], r["backend_start"], r["policy"]) for r in records)
        assert set(per_session.values()) == {1}, per_session  # once each, not once per sweep
        assert {r["pid"] for r in records} == pids
        assert {r["outcome"] for r in records} == {"would_terminate"}
        for c in conns:
            assert await is_alive(c)  # dry run: nothing signalled

        res = await run_cli("audit", "--file", audit, "--summary", "--json")
        assert res.rc == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["total"] == len(pids) == summary["records"]
        assert summary["by_outcome"] == {"would_terminate": len(pids)}
        assert await stop_process(proc) == 0
    finally:
        if proc.returncode is None:
            await stop_process(proc)
        for c in conns:
            c.terminate()


def _record(pid: int, outcome: str, sweep: int, policy: str = "idle") -> dict[str, Any]:
    return {"ts": f"2026-11-25T12:{sweep:02d}:00.000Z", "target": "main", "policy": policy,
            "action": "terminate", "dry_run": outcome.startswith("would_"), "outcome": outcome,
            "pid": pid, "backend_start": "2026-11-25T10:00:00.000Z", "usename": "app",
            "application_name": "web", "client_addr": "10.0.0.1", "server": "db:5432",
            "sweep": f"s{sweep}"}


async def test_summary_counts_each_session_once_per_policy_and_outcome(tmp_path: Path) -> None:
    """A log as older dry runs wrote it (the same leaked session every sweep) next to live
    records: the summary counts sessions, and says how many records it read."""
    records = [_record(pid, "would_terminate", s) for s in range(30) for pid in (1, 2, 3)]
    records += [_record(1, "terminated", 31), _record(2, "terminated", 31)]
    records += [_record(4, "would_terminate", s, "idle-in-transaction") for s in range(5)]
    records += [_record(4, "would_terminate", 6)]  # same session, another policy
    records += [{"ts": "2026-11-25T12:40:00.000Z", "outcome": "failed", "policy": "idle"}] * 2
    audit = tmp_path / "audit.jsonl"
    audit.write_text("".join(json.dumps(r) + "\n" for r in records))
    res = await run_cli("audit", "--file", audit, "--summary", "--json")
    assert res.rc == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["records"] == len(records)
    assert got["total"] == 3 + 2 + 1 + 1 + 2  # records without pid count one each
    assert got["by_outcome"] == {"would_terminate": 5, "terminated": 2, "failed": 2}
    assert got["by_policy"] == {"idle": 8, "idle-in-transaction": 1}
    text = await run_cli("audit", "--file", audit, "--summary")
    assert text.rc == 0, text.stderr
    first = text.stdout.splitlines()[0]
    assert first.split()[:2] == ["total", "9"] and f"from {len(records)} records" in first


async def test_dry_run_memory_forgets_sessions_that_are_gone(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """What a dry run remembers is bounded by the sessions present: sessions that come and
    go leave nothing behind, and a new session on a reused pid is a new session."""
    config = load_config(str(policy_file(tmp_path, pg, idle="1s", dry_run=True)))
    audit = AuditLog(tmp_path / "audit.jsonl")
    wd = await connect(pg, WATCHDOG_ROLE, "wd-under-test")
    server = f"127.0.0.1:{pg.port}"
    try:
        for round_ in range(4):
            conns = [await idle_app_session(pg, f"churn-{round_}-{i}") for i in range(3)]
            await asyncio.sleep(1.2)  # past the 1s threshold
            for _ in range(2):
                report = await sweep_target(wd, server, config, config.target("main"), audit)
            assert audit.dry_recorded.size() == 3, round_
            assert [r["outcome"] for r in report.records] == []  # second look: nothing new
            pids = {c.get_server_pid() for c in conns}
            for c in conns:
                c.terminate()
            await wait_for(partial(_gone, admin, pids), 5, what="the round's sessions to close")
        await sweep_target(wd, server, config, config.target("main"), audit)
        assert audit.dry_recorded.size() == 0
        per_pid = Counter(r["pid"] for r in read_audit(audit.path))
        assert sum(per_pid.values()) == 12 and set(per_pid.values()) == {1}
    finally:
        audit.close()
        await wd.close()


async def _gone(admin: asyncpg.Connection, pids: set[int]) -> bool:
    return not pids & set(await backends(admin))
