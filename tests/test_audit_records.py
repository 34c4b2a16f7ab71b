"""The audit log on disk: fsync, file mode, torn lines, write-ahead intents and their recovery."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import connect
from scenario import (
    WATCHDOG_ROLE,
    HookConn,
    check_record,
    idle_app_session,
    is_alive,
    policy_file,
    read_audit,
    records_by_pid,
    run_cli,
)

from watchdog.audit.journal import journal_dir, journals
from watchdog.audit.log import AuditLog, make_record
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import load_config
from watchdog.core.decide import decide
from watchdog.core.model import Action, Outcome
from watchdog.pg.snapshot import take_snapshot
from watchdog.service.sweep import sweep_target

TORN = b'{"ts": "2026-01-01T00:00:00.000Z", "target": "main", "policy": "id'


async def _idle_victims(pg: TempCluster, n: int, prefix: str = "victim",
                        age: float = 1.2) -> list[asyncpg.Connection]:
    conns = [await idle_app_session(pg, f"{prefix}-{i}") for i in range(n)]
    await asyncio.sleep(age)
    return conns


async def test_records_reach_the_disk_around_the_signals(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Intent fsynced before any signal; final records fsynced before the sweep returns."""
    config = load_config(str(policy_file(tmp_path, pg, idle="1s")))
    audit = AuditLog(tmp_path / "audit.jsonl")
    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    conns = await _idle_victims(pg, 2)
    wd = await connect(pg, WATCHDOG_ROLE, "wd-under-test")
    try:
        monkeypatch.setattr(os, "fsync", spy)
        async def acting() -> None:
            events.append(("act", ""))

        report = await sweep_target(HookConn(wd, acting), f"127.0.0.1:{pg.port}", config,
                                    config.target("main"), audit)
        monkeypatch.undo()
        assert [r["outcome"] for r in report.records] == ["terminated", "terminated"]
        act_at = events.index(("act", ""))
        synced_before = {p for kind, p in events[:act_at] if kind == "fsync"}
        synced_after = [p for kind, p in events[act_at:] if kind == "fsync"]
        assert str(audit.intent_path) in synced_before, events
        # After the signals: the journal's commit marker, then the log itself.
        assert str(audit.path) in synced_after, events
        assert read_audit(audit.path) == report.records
        for c in conns:
            assert not await is_alive(c)
    finally:
        monkeypatch.undo()
        for c in [*conns, wd]:
            c.terminate()


async def test_audit_fsyncs_leave_the_event_loop_free(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fsync of a sweep runs while the event loop stays free to run other callbacks."""
    config = load_config(str(policy_file(tmp_path, pg, idle="1s")))
    audit = AuditLog(tmp_path / "audit.jsonl")
    loop = asyncio.get_running_loop()
    real_fsync = os.fsync
    loop_ran: list[bool] = []

    def fsync(fd: int) -> None:
        ran = threading.Event()
        loop.call_soon_threadsafe(ran.set)  # can only run if this is not the loop's thread
        loop_ran.append(ran.wait(30))  # generous: a blocked loop never sets it
        real_fsync(fd)

    conns = await _idle_victims(pg, 2)
    wd = await connect(pg, WATCHDOG_ROLE, "wd-under-test")
    try:
        monkeypatch.setattr(os, "fsync", fsync)
        report = await sweep_target(wd, f"127.0.0.1:{pg.port}", config, config.target("main"),
                                    audit)
        monkeypatch.undo()
        assert [r["outcome"] for r in report.records] == ["terminated", "terminated"]
        assert len(loop_ran) >= 2 and all(loop_ran), loop_ran
    finally:
        monkeypatch.undo()
        audit.close()
        for c in [*conns, wd]:
            c.terminate()


async def test_file_mode_and_torn_last_line(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    audit_path = logs / "audit.jsonl"
    config = policy_file(tmp_path, pg, audit_path=audit_path, idle="1s")
    conns = await _idle_victims(pg, 2, "first")
    try:
        res = await run_cli("once", "-c", config, "--json")
        assert res.rc == 0, res.stderr
        assert stat.S_IMODE(audit_path.stat().st_mode) == 0o640
        assert journals(audit_path) == [], "a settled journal is removed when `once` ends"
        first = read_audit(audit_path)
        assert len(first) == 2

        # A crash mid-write left half a record, without a newline, at the end.
        with audit_path.open("ab") as f:
            f.write(TORN)
        conns += await _idle_victims(pg, 3, "second")
        res = await run_cli("once", "-c", config, "--json")
        assert res.rc == 0, res.stderr
        assert stat.S_IMODE(audit_path.stat().st_mode) == 0o640

        lines = audit_path.read_bytes().split(b"\n")
        assert lines[-1] == b""  # ends with a newline
        assert lines[2] == TORN  # the torn line is left alone, on its own line
        parsed = [json.loads(line) for line in lines[:2] + lines[3:-1]]
        assert parsed[:2] == first
        second = parsed[2:]
        assert len(second) == 3
        assert {r["pid"] for r in second} == {c.get_server_pid() for c in conns[2:]}
        for rec in second:
            check_record(rec, pg, outcome="terminated", dry_run=False, idle=1.0)

        # The reviewer copes with the torn line.
        res = await run_cli("audit", "--file", audit_path, "--json")
        assert res.rc == 0, res.stderr
        reviewed = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
        assert sorted(r["pid"] for r in reviewed) == sorted(r["pid"] for r in parsed)
    finally:
        for c in conns:
            c.terminate()


async def _intent_records(pg: TempCluster, tmp_path: Path, n: int,
                          sweep: str) -> tuple[list[dict[str, Any]], list[Action]]:
    """Intent records for ``n`` real idle sessions, as a sweep writes them before signalling."""
    config = load_config(str(policy_file(tmp_path, pg, idle="1s")))
    wd = await connect(pg, WATCHDOG_ROLE, "wd-under-test")
    try:
        snapshot = await take_snapshot(wd)
    finally:
        await wd.close()
    actions = list(decide(snapshot, config, "main").actions)
    assert len(actions) == n, actions
    server = f"127.0.0.1:{pg.port}"
    records = [make_record(Outcome(a, "intent"), server=server, sweep=sweep, query=a.session.query)
               for a in actions]
    return records, actions


async def test_intents_of_a_killed_watchdog_become_unconfirmed(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    conns = await _idle_victims(pg, 3)
    try:
        intents, _ = await _intent_records(pg, tmp_path, 3, "sweep-killed")
        audit = AuditLog(tmp_path / "audit.jsonl")
        audit.write_intents(intents)
        assert audit.intent_path.exists() and len(read_audit(audit.intent_path)) == 3
        assert stat.S_IMODE(audit.intent_path.stat().st_mode) == 0o640
        journal = audit.intent_path
        # Locked while its owner lives: another process (or instance) leaves it alone.
        assert AuditLog(audit.path).recover() == 0
        assert read_audit(audit.path) == []
        audit.close()  # ... as if the watchdog was killed here: unsettled, so left behind
        assert journal.exists()
        assert AuditLog(audit.path).recover() == 3
        logged = read_audit(audit.path)
        assert [r["pid"] for r in logged] == [r["pid"] for r in intents]
        for rec, intent in zip(logged, intents, strict=True):
            assert rec["outcome"] == "unconfirmed"
            assert rec["error"]
            assert rec["sweep"] == "sweep-killed"
            for key in ("pid", "backend_start", "usename", "state_change", "policy", "action"):
                assert rec[key] == intent[key]
        assert not journal.exists()
        # Recovering again records nothing twice.
        assert AuditLog(audit.path).recover() == 0
        assert read_audit(audit.path) == logged
    finally:
        for c in conns:
            c.terminate()


async def test_settled_intents_are_not_duplicated(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conns = await _idle_victims(pg, 2)
    try:
        settled, actions = await _intent_records(pg, tmp_path, 2, "sweep-settled")
        audit = AuditLog(tmp_path / "audit.jsonl")
        audit.write_intents(settled)
        finals = [make_record(Outcome(a, "terminated"), server=f"127.0.0.1:{pg.port}",
                              sweep="sweep-settled", query=a.session.query) for a in actions]
        with monkeypatch.context() as m:  # keep the journal as the append left it
            m.setattr(os, "ftruncate", lambda fd, n: None)
            audit.append(finals)
        lines = audit.intent_path.read_bytes().splitlines(keepends=True)
        assert [json.loads(x).keys() & {"commit", "settled"} for x in lines[2:]] == [
            {"commit"}, {"settled"}]
        audit.close()
        # Killed after the final records reached the disk, before "settled" reached the
        # journal: the commit marker finds them in the log, even once it is rotated.
        journal = journal_dir(audit.path) / "1-00000001.intent"
        journal.write_bytes(b"".join(lines[:3]))
        rotated = audit.path.with_name("audit.jsonl-20261201-1764547200")
        audit.path.rename(rotated)
        assert AuditLog(audit.path).recover() == 0
        assert not journal.exists()
        assert not audit.path.exists() and read_audit(rotated) == finals

        # A journal with a settled sweep and an unsettled one: only the latter is recorded.
        unsettled = [{**r, "sweep": "sweep-lost"} for r in settled]
        journal.write_bytes(b"".join(lines[:3]) + b"".join(
            json.dumps(r).encode() + b"\n" for r in unsettled))
        assert AuditLog(audit.path).recover() == 2
        assert read_audit(rotated) == finals
        assert [(r["sweep"], r["outcome"]) for r in read_audit(audit.path)] == [
            ("sweep-lost", "unconfirmed")] * 2
    finally:
        for c in conns:
            c.terminate()


async def test_once_recovers_a_left_journal(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """`once` (like `run`) first records what a killed predecessor left in the journal."""
    conns = await _idle_victims(pg, 2)
    audit_path = tmp_path / "audit.jsonl"
    try:
        intents, _ = await _intent_records(pg, tmp_path, 2, "sweep-killed")
        left = AuditLog(audit_path)
        left.write_intents(intents)
        left.close()  # its process is gone: the journal stays, unlocked
        for c in conns:  # they went away on their own meanwhile
            await c.close()
        res = await run_cli("once", "-c", policy_file(tmp_path, pg, audit_path=audit_path,
                                                      idle="1s"), "--json")
        assert res.rc == 0, res.stderr
        assert res.json()["targets"][0]["records"] == []
        logged = read_audit(audit_path)
        assert [(r["pid"], r["outcome"]) for r in logged] == [
            (r["pid"], "unconfirmed") for r in intents]
    finally:
        for c in conns:
            c.terminate()


def _two_targets(tmp_path: Path, pg: TempCluster, audit_path: Path) -> Path:
    """Two targets on one server, each with its own victims (team-a-* and team-b-*).

    The second connects to another database: advisory locks are per database, so each
    target's sweep holds its own leader lock and both act.
    """
    if not pg.psql("SELECT 1 FROM pg_database WHERE datname = 'team_b'").strip():
        pg.psql("CREATE DATABASE team_b")
    dsn = pg.dsn(WATCHDOG_ROLE)
    other = pg.dsn(WATCHDOG_ROLE, "team_b")
    return policy_file(tmp_path, pg, audit_path=audit_path, idle="1s", extra={
        "targets": [{"name": "main", "dsn": dsn}, {"name": "replica-view", "dsn": other}],
        "policies": [
            {"name": "idle-a", "state": "idle", "longer_than": "1s", "targets": ["main"],
             "applications": ["team-a-*"]},
            {"name": "idle-b", "state": "idle", "longer_than": "1s",
             "targets": ["replica-view"], "applications": ["team-b-*"]},
        ],
    })


async def test_two_targets_one_record_per_termination(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """`once` sweeps its targets concurrently into one audit log: each termination must still
    have exactly one record (a concurrent sweep's intents are not a dead watchdog's)."""
    audit_path = tmp_path / "audit.jsonl"
    config = _two_targets(tmp_path, pg, audit_path)
    conns = [await idle_app_session(pg, f"team-{team}-{i}") for team in "ab" for i in range(3)]
    pids = {c.get_server_pid() for c in conns}
    await asyncio.sleep(1.2)
    try:
        res = await run_cli("once", "-c", config, "--json")
        assert res.rc == 0, res.stderr
        logged = read_audit(audit_path)
        by_pid = records_by_pid(logged)
        assert set(by_pid) == pids
        dupes = {pid: [r["outcome"] for r in recs] for pid, recs in by_pid.items()
                 if len(recs) != 1}
        assert not dupes, f"terminations with more than one audit record: {dupes}"
        assert {r["outcome"] for r in logged} == {"terminated"}
        for c in conns:
            assert not await is_alive(c)
        assert journals(audit_path) == []
    finally:
        for c in conns:
            c.terminate()


async def test_concurrent_sweeps_keep_each_others_intents(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """While sweep A signals, sweep B (another target) runs start to end on the same AuditLog:
    A's intents must stay in the journal until A's own final records are on disk."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    config = load_config(str(_two_targets(tmp_path, pg, audit.path)))
    conns = [await idle_app_session(pg, f"team-{team}-{i}") for team in "ab" for i in range(2)]
    pids_a = {c.get_server_pid() for c in conns[:2]}
    pids_b = {c.get_server_pid() for c in conns[2:]}
    await asyncio.sleep(1.2)
    wd_a = await connect(pg, WATCHDOG_ROLE, "wd-under-test-a")
    wd_b = await connect(pg, WATCHDOG_ROLE, "wd-under-test-b")
    server = f"127.0.0.1:{pg.port}"
    journal_after_b: list[dict[str, Any]] = []

    async def b_sweeps_meanwhile() -> None:
        report_b = await sweep_target(wd_b, server, config, config.target("replica-view"), audit)
        assert {r["pid"] for r in report_b.records} == pids_b
        journal_after_b.extend(read_audit(audit.intent_path))

    try:
        report_a = await sweep_target(HookConn(wd_a, b_sweeps_meanwhile), server, config,
                                      config.target("main"), audit)
        assert journal_after_b, "sweep B cleared sweep A's intents while A was signalling"
        assert pids_a <= {r.get("pid") for r in journal_after_b}
        assert {r["pid"]: r["outcome"] for r in report_a.records} == dict.fromkeys(
            pids_a, "terminated")
        logged = read_audit(audit.path)
        assert sorted(r["pid"] for r in logged) == sorted(pids_a | pids_b)
        assert {r["outcome"] for r in logged} == {"terminated"}
        assert audit.intent_path.stat().st_size == 0  # all settled: the journal is empty
        assert AuditLog(audit.path).recover() == 0
    finally:
        for c in [*conns, wd_a, wd_b]:
            c.terminate()
