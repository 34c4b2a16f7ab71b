"""Helpers for the reload tests: a policy file to rewrite, the watchdog's backend and lock as
the server sees them, victims that must die, a reload, and sweeps held up on a lock."""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from daemon import Daemon, audit_records, backend_alive
from helpers import connect, wait_for

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import LEADER_KEY
from watchdog.pg import queries

# Nothing listens on 127.0.0.2 (sessions come from 127.0.0.1, so none is the pooler's).
DOWN_POOLER = "postgresql://watchdog@127.0.0.2:6432/pgbouncer"


def policy(
    path: Path,
    cluster: TempCluster,
    *,
    interval: str = "1s",
    dsn: str | None = None,
    pooler: bool = False,
    password_file: Path | None = None,
    audit: Path | None = None,
    targets: tuple[str, ...] = ("main",),
    extra: str = "",
) -> Path:
    """A policy file terminating role app's sessions idle for 1 s, on each named target."""
    more = ""
    if pooler:
        more += f"\n    poolers: [{{name: pgb, dsn: '{DOWN_POOLER}'}}]"
    if password_file is not None:
        more += f"\n    password_file: {password_file}"
    entries = "".join(
        f"\n  - name: {name}\n    dsn: {dsn or cluster.dsn('watchdog')}\n    interval: {interval}"
        + more
        for name in targets
    )
    path.write_text(
        f"""
targets:{entries}
exclude:
  superusers: true
  applications: ["psql"]
policies:
  - name: idle
    state: idle
    longer_than: 1s
    users: [app]
audit:
  path: {audit or path.parent / "audit.jsonl"}
{extra}
"""
    )
    return path


async def watchdog_pids(cluster: TempCluster) -> list[int]:
    conn = await connect(cluster, "postgres", "psql")
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-watchdog'"
        )
    finally:
        await conn.close()
    return sorted(r["pid"] for r in rows)


async def lock_holder(cluster: TempCluster) -> int | None:
    conn = await connect(cluster, "postgres", "psql")
    try:
        pid: int | None = await conn.fetchval(queries.LOCK_HOLDER, LEADER_KEY)
        return pid
    finally:
        await conn.close()


async def leader(cluster: TempCluster) -> int:
    """The backend pid of the one watchdog connection, once it holds the leader lock."""

    async def leads() -> bool:
        pids = await watchdog_pids(cluster)
        return len(pids) == 1 and await lock_holder(cluster) == pids[0]

    await wait_for(leads, timeout=30, interval=0.1, what="the watchdog to hold the lock")
    return (await watchdog_pids(cluster))[0]


async def killed(cluster: TempCluster, audit: Path) -> int:
    """Open an idle session of role app and wait until it is terminated and recorded."""
    conn = await connect(cluster, "app", application_name="leaky")
    pid = conn.get_server_pid()

    async def gone() -> bool:
        return not await backend_alive(cluster, pid)

    await wait_for(gone, timeout=30, interval=0.1, what=f"backend {pid} to be terminated")
    await wait_for(
        lambda: any(r["pid"] == pid for r in audit_records(audit)), timeout=30, what="its record"
    )
    conn.terminate()
    return pid


async def reload(d: Daemon) -> None:
    done = d.log().count("reloaded ") + d.log().count("reload rejected")
    d.proc.send_signal(signal.SIGHUP)
    await wait_for(
        lambda: d.log().count("reloaded ") + d.log().count("reload rejected") > done,
        timeout=30,
        what="the reload",
    )


@asynccontextmanager
async def sweeps_held_up(cluster: TempCluster, pid: int) -> AsyncIterator[None]:
    """The watchdog's next snapshot waits on a lock until the block ends (well inside the
    sweep timeout of 5 s)."""
    admin = await connect(cluster, "postgres", "psql")
    tx = admin.transaction()
    await tx.start()
    try:
        await admin.execute("LOCK TABLE pg_authid IN ACCESS EXCLUSIVE MODE")

        async def waiting() -> bool:
            return bool(
                await admin.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                )
            )

        await wait_for(waiting, timeout=10, interval=0.02, what="a sweep waiting on the lock")
        yield
    finally:
        await tx.rollback()
        await admin.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def clean(log: str) -> None:
    for bad in ("Traceback", "RuntimeError", "unexpectedly", "unreachable", "lost the leader"):
        assert bad not in log, log
