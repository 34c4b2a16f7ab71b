"""One sweep against a real server: who dies, who is spared, what the audit log says.

Thresholds are short (idle 2 s, idle in transaction 1 s); the old sessions age 2.5 s, the
young one is opened right before the sweep and kept young while the `pg-watchdog` process
starts and looks (scenario.kept_young), so every verdict is deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from helpers import connect, wait_for
from scenario import (
    APP_ROLE,
    WATCHDOG_ROLE,
    HookConn,
    Mix,
    backends,
    check_active_alive,
    check_record,
    idle_app_session,
    is_alive,
    kept_young,
    open_old_sessions,
    open_young_sessions,
    policy_file,
    read_audit,
    records_by_pid,
    run_cli,
    server_backends,
    wait_gone,
)

from watchdog.audit.journal import journals
from watchdog.audit.log import AuditLog
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import load_config
from watchdog.core.decide import decide
from watchdog.pg import act
from watchdog.pg.snapshot import take_snapshot
from watchdog.service.sweep import sweep_target

AGE = 2.5  # > idle threshold 2s > idle-in-transaction threshold 1s


@contextlib.asynccontextmanager
async def scenario(pg: TempCluster) -> AsyncIterator[Mix]:
    mix = await open_old_sessions(pg)
    try:
        yield mix
    finally:
        await mix.close()


async def _once(config: Path, *extra: str, stderr: str = "") -> dict[str, Any]:
    """``pg-watchdog once -c CONFIG --json``; its report for the one target."""
    res = await run_cli("once", "-c", config, "--json", *extra)
    assert res.rc == 0, (res.rc, res.stderr, res.stdout)
    if stderr:
        assert stderr in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    else:
        assert res.stderr == "", res.stderr
    out = res.json()
    [target] = out["targets"]
    assert target["target"] == "main" and "error" not in target, target
    return target


async def test_one_sweep_terminates_exactly_the_victims(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    audit_path = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path, pg, audit_path=audit_path, self_trap=True)
    async with scenario(pg) as mix:
        await asyncio.sleep(AGE)
        await open_young_sessions(pg, mix, admin)
        before = await backends(admin)
        server_procs = await server_backends(admin)
        assert {"checkpointer", "autovacuum launcher"} <= {t for _, t in server_procs}
        for name, pid in mix.pids.items():
            assert pid in before, name

        async with kept_young(mix.spared["young"]):  # well under 2 s idle as the sweep looks
            summary = await _once(config)

        # Exactly the two victims were acted on, both terminated.
        records = summary["records"]
        assert sorted(r["pid"] for r in records) == sorted(mix.victim_pids()), records
        assert {r["outcome"] for r in records} == {"terminated"}
        assert summary["actions"] == 2 and summary["over_limit"] == 0

        # Liveness, the way a client sees it.
        for name, conn in mix.victims.items():
            assert not await is_alive(conn), f"{name} survived the sweep"
        for name, conn in mix.spared.items():
            assert await is_alive(conn), f"{name} was terminated"
        after = await backends(admin)
        assert not mix.victim_pids() & set(after)
        await check_active_alive(mix, admin)
        # Every long-lived server process is still there (same pid).
        assert server_procs <= await server_backends(admin)
        # The watchdog never matched itself (self-trap policy) nor any other role's backend.
        assert all(r["usename"] == APP_ROLE for r in records)
        assert WATCHDOG_ROLE not in {r["usename"] for r in records}

        # The audit log: exactly one complete record per termination, same as the report.
        logged = read_audit(audit_path)
        by_pid = records_by_pid(logged)
        assert set(by_pid) == mix.victim_pids()
        for pid, recs in by_pid.items():
            assert len(recs) == 1, recs
            rec = recs[0]
            check_record(rec, pg, outcome="terminated", dry_run=False)
            assert rec["backend_start"] is not None
            name = mix.name_of(pid)
            assert rec["application_name"] == {
                "idle": "billing-api", "idle_in_transaction": "billing-worker"}[name]
            assert rec["policy"] == {
                "idle": "idle", "idle_in_transaction": "idle-in-transaction"}[name]
        assert logged == records
        assert all(p.stat().st_size == 0 for p in journals(audit_path))


async def test_dry_run_signals_nothing_and_matches_the_live_run(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    audit_path = tmp_path / "audit.jsonl"
    live_config = policy_file(tmp_path, pg, audit_path=audit_path, self_trap=True)
    variants: list[tuple[str, Path, tuple[str, ...]]] = [
        ("--dry-run", live_config, ("--dry-run",)),
        ("dry_run: true", policy_file(tmp_path, pg, audit_path=audit_path, self_trap=True,
                                      dry_run=True, name="top.yaml"), ()),
        ("policy dry_run: true", policy_file(tmp_path, pg, audit_path=audit_path,
                                             self_trap=True, policy_dry_run=True,
                                             name="per-policy.yaml"), ()),
    ]
    async with scenario(pg) as mix:
        await asyncio.sleep(AGE)
        await open_young_sessions(pg, mix, admin)
        start = await backends(admin)
        dry_sets: dict[str, set[int]] = {}
        n_logged = 0
        for label, config, extra in variants:
            # The young session stays young: statements keep resetting its state_change.
            async with kept_young(mix.spared["young"]):
                summary = await _once(config, *extra)
            records = summary["records"]
            assert {r["outcome"] for r in records} == {"would_terminate"}, (label, records)
            dry_sets[label] = {r["pid"] for r in records}
            for r in records:
                check_record(r, pg, outcome="would_terminate", dry_run=True)
            logged = read_audit(audit_path)
            assert logged[n_logged:] == records, label
            n_logged = len(logged)
            # Nothing was signalled: every session is there, untouched (same state_change).
            # (Looking, not running SELECT 1, which would reset the victims' idle clocks.)
            now = await backends(admin)
            for name, pid in mix.pids.items():
                assert pid in now, f"{label}: {name} was terminated in a dry run"
                assert now[pid]["backend_start"] == start[pid]["backend_start"]
                if name not in ("young", "active"):
                    assert now[pid]["state_change"] == start[pid]["state_change"], (label, name)

        async with kept_young(mix.spared["young"]):
            live = await _once(live_config)
        live_pids = {r["pid"] for r in live["records"] if r["outcome"] == "terminated"}
        assert live_pids == {r["pid"] for r in live["records"]}
        assert live_pids == mix.victim_pids()
        for label, pids in dry_sets.items():
            assert pids == live_pids, label
        for name, conn in mix.victims.items():
            assert not await is_alive(conn), name
        for name, conn in mix.spared.items():
            assert await is_alive(conn), name
        await check_active_alive(mix, admin)


async def _race_victims(pg: TempCluster) -> dict[str, asyncpg.Connection]:
    victims = {
        name: await idle_app_session(pg, f"race-{name}")
        for name in ("changed", "closed", "plain1", "plain2")
    }
    await asyncio.sleep(1.2)  # idle threshold 1s
    return victims


async def _make_race(pg: TempCluster, admin: asyncpg.Connection,
                     victims: dict[str, asyncpg.Connection]) -> asyncpg.Connection:
    """The 'changed' victim runs a statement; the 'closed' one goes away and is replaced."""
    await victims["changed"].execute("SELECT 1")
    pid = victims["closed"].get_server_pid()
    await victims["closed"].close()
    await wait_gone(admin, pid)
    return await idle_app_session(pg, "race-closed")


async def test_race_between_look_and_act(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    config = load_config(str(policy_file(tmp_path, pg, idle="1s", self_trap=True)))
    victims = await _race_victims(pg)
    pids = {n: c.get_server_pid() for n, c in victims.items()}
    wd = await connect(pg, WATCHDOG_ROLE, "wd-under-test")
    replacement = None
    try:
        snapshot = await take_snapshot(wd)
        decision = decide(snapshot, config, "main")
        acted = {a.session.pid for a in decision.actions}
        # Own backend: the self-trap policy matches it, the own-backend rule spares it.
        assert snapshot.own_pid == wd.get_server_pid()
        assert snapshot.own_pid not in acted
        assert acted == set(pids.values()), (acted, pids)

        replacement = await _make_race(pg, admin, victims)
        outcomes = await act.execute(wd, list(decision.actions))
        got = {o.action.session.pid: o.outcome for o in outcomes}
        assert got == {
            pids["changed"]: "skipped_changed",
            pids["closed"]: "gone",
            pids["plain1"]: "terminated",
            pids["plain2"]: "terminated",
        }
        assert all(o.error is None for o in outcomes)
        assert await is_alive(victims["changed"])
        assert await is_alive(replacement)
        assert not await is_alive(victims["plain1"])
        assert not await is_alive(victims["plain2"])
        assert await is_alive(wd)
    finally:
        for conn in [*victims.values(), replacement, wd]:
            if conn is not None:
                conn.terminate()


async def test_race_through_sweep_target_is_audited(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    config = load_config(str(policy_file(tmp_path, pg, idle="1s", self_trap=True)))
    audit = AuditLog(tmp_path / "audit.jsonl")
    victims = await _race_victims(pg)
    pids = {n: c.get_server_pid() for n, c in victims.items()}
    wd = await connect(pg, WATCHDOG_ROLE, "wd-under-test")
    replacement: list[asyncpg.Connection] = []

    async def race() -> None:
        replacement.append(await _make_race(pg, admin, victims))

    try:
        report = await sweep_target(HookConn(wd, race), f"127.0.0.1:{pg.port}", config,
                                    config.target("main"), audit)
        assert replacement, "the action statement never ran"
        expected = {
            pids["changed"]: "skipped_changed",
            pids["closed"]: "gone",
            pids["plain1"]: "terminated",
            pids["plain2"]: "terminated",
        }
        assert {r["pid"]: r["outcome"] for r in report.records} == expected
        logged = read_audit(audit.path)
        assert {r["pid"]: r["outcome"] for r in logged} == expected
        assert len(logged) == 4
        assert all(r["dry_run"] is False and r["error"] is None for r in logged)
        assert not audit.intent_path.exists() or audit.intent_path.stat().st_size == 0
        assert await is_alive(victims["changed"])
        assert await is_alive(replacement[0])
        assert not await is_alive(victims["plain1"])
        assert not await is_alive(victims["plain2"])
    finally:
        for conn in [*victims.values(), *replacement, wd]:
            conn.terminate()


async def test_max_per_sweep_takes_the_oldest_first(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    audit_path = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path, pg, audit_path=audit_path, idle="1s", max_per_sweep=3)
    conns: list[asyncpg.Connection] = []
    try:
        for i in range(6):
            if i:
                await asyncio.sleep(0.3)
            conns.append(await idle_app_session(pg, f"batch-{i}"))
        pids = [c.get_server_pid() for c in conns]  # oldest first
        await asyncio.sleep(1.2)  # the youngest is past 1s too

        first = await _once(config, stderr="3 more sessions matched beyond "
                            "limits.max_per_sweep=3")
        assert first["over_limit"] == 3
        assert [r["pid"] for r in first["records"]] == pids[:3]  # oldest first
        assert {r["outcome"] for r in first["records"]} == {"terminated"}
        for c in conns[:3]:
            assert not await is_alive(c)
        # The others are untouched (looked at, not queried: SELECT 1 would reset their age).
        present = await backends(admin)
        assert [pid in present for pid in pids] == [False] * 3 + [True] * 3

        second = await _once(config)
        assert second["over_limit"] == 0
        assert [r["pid"] for r in second["records"]] == pids[3:]
        assert {r["outcome"] for r in second["records"]} == {"terminated"}
        for c in conns:
            assert not await is_alive(c)
        assert [r["pid"] for r in read_audit(audit_path)] == pids
    finally:
        for c in conns:
            c.terminate()


async def test_young_session_crosses_its_threshold_later(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """The young session of the scenario is spared only because it is young."""
    config = policy_file(tmp_path, pg, idle="4s")
    conn = await idle_app_session(pg, "billing-api")
    try:
        async with kept_young(conn):
            first = await _once(config)
        assert first["records"] == []
        assert await is_alive(conn)
        await conn.execute("SELECT 1")
        pid = conn.get_server_pid()

        async def due() -> bool:
            return (await admin.fetchval(
                "SELECT now() - state_change > interval '4.05 s' FROM pg_stat_activity"
                " WHERE pid = $1", pid)) is True

        await wait_for(due, 10, what="the session to pass 4s idle")
        second = await _once(config)
        assert [r["pid"] for r in second["records"]] == [pid]
        assert not await is_alive(conn)
    finally:
        conn.terminate()
