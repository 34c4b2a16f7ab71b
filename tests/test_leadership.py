"""Who competes for the leader lock, with real `pg-watchdog run` processes on a real server:
only instances that may act; lock_key separates deployments; `check --connect` names the
holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from daemon import Daemon, audit_records, backend_alive, write_config
from helpers import connect, wait_for
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster

# PGPASSFILE: the passfile of the throwaway servers (conftest exports it before this runs).
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k == "PGPASSFILE"}


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    return pg


async def _victim(cluster: TempCluster) -> tuple[asyncpg.Connection, int]:
    conn = await connect(cluster, "app", application_name="leaky")
    return conn, await conn.fetchval("SELECT pg_backend_pid()")


async def _dies(cluster: TempCluster, pid: int, audit: Path) -> None:
    """The backend is gone and its record written (the record follows the confirmation)."""

    async def gone() -> bool:
        return not await backend_alive(cluster, pid)

    await wait_for(gone, timeout=30, interval=0.1, what=f"backend {pid} to be terminated")
    await wait_for(
        lambda: any(r["pid"] == pid for r in audit_records(audit)),
        timeout=30,
        what=f"the record of {pid}",
    )


def _check(cfg: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "watchdog", "check", "--connect", "-c", str(cfg)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("how", ["flag", "config"])
async def test_a_dry_run_instance_started_first_leaves_the_lock_to_the_live_one(
    cluster: TempCluster, tmp_path: Path, how: str
) -> None:
    dry_audit, live_audit = tmp_path / "dry.jsonl", tmp_path / "live.jsonl"
    cfg_dry = write_config(
        tmp_path / "dry.yaml", cluster, audit=dry_audit, extra="dry_run: true" * (how == "config")
    )
    cfg_live = write_config(tmp_path / "live.yaml", cluster, audit=live_audit)
    args = ("--dry-run",) if how == "flag" else ()
    with Daemon(cfg_dry, None, *args) as dry:
        conn, pid = await _victim(cluster)
        # The trial instance sweeps, decides and records what it would do, lock or not.
        await wait_for(
            lambda: [r["outcome"] for r in audit_records(dry_audit) if r["pid"] == pid],
            timeout=30,
            what="the dry run's record",
        )
        assert all(r["outcome"] == "would_terminate" for r in audit_records(dry_audit))
        with Daemon(cfg_live) as live:
            await wait_for(lambda: "this instance acts" in live.log(), timeout=30, what="leads")
            await _dies(cluster, pid, live_audit)
            conn.terminate()
            assert [(r["pid"], r["outcome"]) for r in audit_records(live_audit)] == [
                (pid, "terminated")
            ]
            assert live.stop() == 0
        assert "this instance acts" not in dry.log()
        assert dry.stop() == 0


async def test_instances_with_different_lock_keys_both_act(
    cluster: TempCluster, tmp_path: Path
) -> None:
    cfg_a = write_config(tmp_path / "a.yaml", cluster, audit=tmp_path / "a.jsonl", idle="1h")
    cfg_b = write_config(
        tmp_path / "b.yaml", cluster, audit=tmp_path / "b.jsonl", idle="1h", extra="lock_key: 42"
    )
    with Daemon(cfg_a) as a, Daemon(cfg_b) as b:
        await wait_for(lambda: "this instance acts" in a.log(), timeout=30, what="a leads")
        await wait_for(lambda: "this instance acts" in b.log(), timeout=30, what="b leads")
        assert a.stop() == 0 and b.stop() == 0


async def test_check_connect_names_the_lock_holder(cluster: TempCluster, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "p.yaml", cluster, idle="1h")
    assert "no instance holds it" in _check(cfg)
    with Daemon(cfg) as d:
        await wait_for(lambda: "this instance acts" in d.log(), timeout=30, what="leads")
        admin = await connect(cluster)
        try:
            pid = await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-watchdog'"
            )
        finally:
            await admin.close()
        out = _check(cfg)
        assert f"held by pid {pid} (pg-watchdog) from 127.0.0.1 since " in out, out
        assert d.stop() == 0


async def test_a_leader_whose_connection_was_killed_leads_again_only_by_winning_the_lock(
    cluster: TempCluster, tmp_path: Path
) -> None:
    logs = {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"}
    cfg_a = write_config(tmp_path / "a.yaml", cluster, audit=logs["a"])
    cfg_b = write_config(tmp_path / "b.yaml", cluster, audit=logs["b"])
    with Daemon(cfg_a) as a:
        await wait_for(lambda: "this instance acts" in a.log(), timeout=30, what="a leads")
        with Daemon(cfg_b) as b:
            await wait_for(lambda: "observing" in b.log(), timeout=30, what="b observes")
            marks = {"a": len(a.log()), "b": len(b.log())}
            # The server ends A's session (and its lock) between sweeps; A reconnects.
            cluster.psql(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l"
                " WHERE l.locktype = 'advisory' AND l.granted"
            )
            daemons = {"a": a, "b": b}

            def acting() -> list[str]:
                return [
                    n for n, d in daemons.items() if "this instance acts" in d.log()[marks[n] :]
                ]

            # A's new connection starts as an observer: it says which role the lock gave it.
            await wait_for(
                lambda: "observing" in a.log()[marks["a"] :] or acting() == ["a"],
                timeout=30,
                what="a to lead or observe by the lock on its new connection",
            )
            await wait_for(lambda: len(acting()) == 1, timeout=30, what="one new leader")
            [leader] = acting()
            other = "b" if leader == "a" else "a"
            conn, pid = await _victim(cluster)
            await _dies(cluster, pid, logs[leader])
            conn.terminate()
            assert [r["pid"] for r in audit_records(logs[leader])] == [pid]
            assert audit_records(logs[other]) == [], f"{other} acted without the lock"
            assert b.stop() == 0
        assert a.stop() == 0


async def test_a_leader_reloaded_into_dry_run_hands_the_lock_over(
    cluster: TempCluster, tmp_path: Path
) -> None:
    logs = {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"}
    cfg_a = write_config(tmp_path / "a.yaml", cluster, audit=logs["a"])
    cfg_b = write_config(tmp_path / "b.yaml", cluster, audit=logs["b"])
    with Daemon(cfg_a) as a:
        await wait_for(lambda: "this instance acts" in a.log(), timeout=30, what="a leads")
        with Daemon(cfg_b) as b:
            await wait_for(lambda: "observing" in b.log(), timeout=30, what="b observes")
            write_config(cfg_a, cluster, audit=logs["a"], extra="dry_run: true")
            a.proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: "this instance acts" in b.log(), timeout=30, what="b leads")
            conn, pid = await _victim(cluster)
            await _dies(cluster, pid, logs["b"])
            conn.terminate()
            assert [r["outcome"] for r in audit_records(logs["b"]) if r["pid"] == pid] == [
                "terminated"
            ]
            assert {r["outcome"] for r in audit_records(logs["a"])} <= {"would_terminate"}
            assert b.stop() == 0
        assert a.stop() == 0
