"""A slow audit disk is not a dead server.

The audit path stalls for real: another process holds the log's flock (every append takes
it), exactly as a writer stuck in fsync would hold it. The sweep that has just killed its
victims cannot write their records: the service keeps its connection and the leader lock,
sends one audit alert (real sentry-sdk, local endpoint), reports the kills to alerts and
metrics, signals nothing more while the log is stuck, and writes the records once it
answers. Real server, real `pg-watchdog run`.
"""

from __future__ import annotations

import fcntl
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import free_port, sweeps_ran, wait_for
from scenario import (
    backends,
    idle_app_session,
    is_alive,
    policy_file,
    read_audit,
    start_service,
    stop_process,
)
from sentry_endpoint import SentryEndpoint

from watchdog.audit.journal import journals
from watchdog.commands.demo.tempcluster import TempCluster


@pytest.fixture
def sentry() -> Iterator[SentryEndpoint]:
    with SentryEndpoint() as endpoint:
        yield endpoint


def _metric(port: int, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m[1] for k, v in labels.items()):
            return float(m[2])
    return None


def _events(sentry: SentryEndpoint, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in sentry.events()
            if kind is None or e.get("tags", {}).get("kind") == kind]


def _acted(sentry: SentryEndpoint) -> list[dict[str, Any]]:
    return [e for e in sentry.events() if "terminated 1 session " in str(e.get("message"))]


async def _watchdog(admin: asyncpg.Connection) -> tuple[int, bool]:
    """The pid of pg-watchdog's backend, and whether it holds an advisory lock."""
    row = await admin.fetchrow(
        "SELECT a.pid, EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid"
        " AND l.locktype = 'advisory' AND l.granted) AS leads"
        " FROM pg_stat_activity a WHERE a.application_name = 'pg-watchdog'")
    assert row is not None, "pg-watchdog is not connected"
    return row["pid"], row["leads"]


async def test_stalled_audit_keeps_the_connection_and_reports_the_kills(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path, sentry: SentryEndpoint
) -> None:
    audit = tmp_path / "audit.jsonl"
    port = free_port()
    config = policy_file(tmp_path, pg, audit_path=audit, idle="1s", interval="1s", extra={
        "alerts": {"sentry": {"dsn": sentry.dsn}},
        "metrics": {"listen": f"127.0.0.1:{port}"},
    })
    log = tmp_path / "run.log"
    proc = await start_service(config, log)
    conns: list[asyncpg.Connection] = []
    holder = os.open(audit, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        await wait_for(lambda: "this instance acts" in log.read_text(), 15,
                       what="pg-watchdog to lead")
        backend, leads = await _watchdog(admin)
        assert leads
        fcntl.flock(holder, fcntl.LOCK_EX)  # the audit path stalls from here on
        # One victim: two could cross their threshold a sweep apart, and the second sweep
        # rightly signals nothing while the log is stuck.
        conns = [await idle_app_session(pg, "victim")]
        pids = {c.get_server_pid() for c in conns}

        async def killed() -> bool:
            return not pids & set(await backends(admin))

        await wait_for(killed, 15, what="the victim to be terminated")
        # The final append waits on the log: after its own timeout, one audit alert.
        sentry.wait_for(lambda: _events(sentry, "audit"), timeout=20)
        await wait_for(lambda: _metric(port, "pg_watchdog_actions_total", outcome="terminated")
                       == 1.0, 10, what="the kill in the metrics")
        sentry.wait_for(lambda: _acted(sentry), timeout=20)  # the kills reach on-call too
        assert read_audit(audit) == []  # not written yet: the log is still held

        # A newcomer past its threshold is not signalled while the log cannot take records.
        late = await idle_app_session(pg, "victim-late")
        conns.append(late)
        await sweeps_ran(pg, 4)
        assert await is_alive(late), "signalled while the audit log could not be written"
        assert await _watchdog(admin) == (backend, True), "connection or leader lock dropped"
        assert len(_events(sentry, "audit")) == 1, _events(sentry, "audit")
        assert not _events(sentry, "unreachable"), _events(sentry, "unreachable")
        assert proc.returncode is None, log.read_text()

        fcntl.flock(holder, fcntl.LOCK_UN)  # the disk answers again

        def written() -> set[int]:
            return {r["pid"] for r in read_audit(audit) if r["outcome"] == "terminated"}

        await wait_for(lambda: pids <= written(), 15, what="the held-back records")
        await wait_for(lambda: late.get_server_pid() in written(), 15,
                       what="the newcomer killed and recorded once the log answers")
        assert await _watchdog(admin) == (backend, True)
        assert await stop_process(proc) == 0
        records = read_audit(audit)
        assert sorted(r["pid"] for r in records) == sorted([*pids, late.get_server_pid()])
        assert all(p.stat().st_size == 0 for p in journals(audit))
        assert "Traceback" not in log.read_text()
    finally:
        os.close(holder)
        if proc.returncode is None:
            await stop_process(proc)
        for c in conns:
            c.terminate()
