"""`pg-watchdog run`: the real service process, its scheduler, its punctuality and its exit."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import asyncpg
from helpers import connect, sweeps_ran, wait_for
from scenario import (
    APP_ROLE,
    backends,
    idle_app_session,
    is_alive,
    policy_file,
    read_audit,
    start_service,
    stop_process,
)

from watchdog.audit.journal import journals
from watchdog.commands.demo.tempcluster import TempCluster

IDLE = 2.0
INTERVAL = 1.0
# Far above any lateness under load (other engineers' suites share the 2 cores); how
# punctual it is, is bench/punctuality.py's to say.
SLACK = 10.0


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


async def _watchdog_connected(admin: asyncpg.Connection, proc: asyncio.subprocess.Process,
                              log: Path) -> None:
    async def connected() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"pg-watchdog run exited: {_read(log)}")
        return any(r["application_name"] == "pg-watchdog" and r["usename"] == "watchdog"
                   for r in (await backends(admin)).values())

    await wait_for(connected, 60, what="pg-watchdog run to connect")


async def test_run_kills_on_time_and_stops_on_sigterm(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    audit_path = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path, pg, audit_path=audit_path, idle=f"{IDLE:g}s",
                         interval=f"{INTERVAL:g}s")
    log = tmp_path / "run.log"
    proc = await start_service(config, log)
    victim = None
    try:
        await _watchdog_connected(admin, proc, log)
        loop = asyncio.get_running_loop()
        victim = await connect(pg, APP_ROLE, "billing-api")
        await victim.execute("SELECT 1")
        idle_since = loop.time()  # the server's state_change is a little earlier
        pid = victim.get_server_pid()

        async def dead() -> bool:
            return pid not in await backends(admin)

        await wait_for(dead, IDLE + INTERVAL + SLACK + 2, interval=0.02, what="the victim to die")
        died_after = loop.time() - idle_since
        assert died_after <= IDLE + INTERVAL + SLACK, f"killed {died_after:.2f}s after idle"
        assert died_after >= IDLE - 0.1, f"killed before its threshold ({died_after:.2f}s)"
        assert not await is_alive(victim)

        # Write-ahead: by the time the backend is gone, its intent (or final record) is on disk.
        journaled = [r for j in journals(audit_path) for r in read_audit(j)]
        noted = [r for r in journaled + read_audit(audit_path) if r.get("pid") == pid]
        assert noted, "a backend was terminated before anything about it was on disk"

        # The final record follows as soon as the termination is confirmed.
        async def recorded() -> bool:
            return any(r["pid"] == pid for r in read_audit(audit_path))

        await wait_for(recorded, 30, what="the audit record of the termination")
        assert proc.returncode is None
        [rec] = [r for r in read_audit(audit_path) if r["pid"] == pid]
        assert rec["outcome"] == "terminated" and rec["policy"] == "idle"
        assert rec["age_s"] > IDLE

        started = loop.time()
        assert await stop_process(proc, signal.SIGTERM, timeout=5) == 0, log.read_text()
        assert loop.time() - started < 5
        assert [r["pid"] for r in read_audit(audit_path)] == [pid]
        text = log.read_text()
        assert "Traceback" not in text and "ERROR" not in text, text

        # Its monitoring connection is gone with it.
        async def watchdog_gone() -> bool:
            return not any(r["application_name"] == "pg-watchdog"
                           for r in (await backends(admin)).values())

        await wait_for(watchdog_gone, 30, what="the watchdog's connection to close")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if victim is not None:
            victim.terminate()


async def test_run_spares_a_session_that_keeps_working(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """A session that runs a statement every second never reaches the 2s idle threshold."""
    config = policy_file(tmp_path, pg, idle=f"{IDLE:g}s", interval=f"{INTERVAL:g}s")
    log = tmp_path / "run.log"
    proc = await start_service(config, log)
    busy = None
    try:
        await _watchdog_connected(admin, proc, log)
        busy = await idle_app_session(pg, "worker")
        stop = asyncio.Event()

        async def work(conn: asyncpg.Connection) -> None:  # idle at most ~0.5 s at a time
            while await is_alive(conn):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
                    return

        worker = asyncio.create_task(work(busy))
        try:
            await sweeps_ran(pg, 4)  # each saw it idle well under the 2 s threshold
        finally:
            stop.set()
            await worker
        assert await is_alive(busy)
        assert read_audit(tmp_path / "audit.jsonl") == []
        assert await stop_process(proc, signal.SIGTERM, timeout=5) == 0, log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if busy is not None:
            busy.terminate()


async def test_run_stops_on_sigint(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    config = policy_file(tmp_path, pg, idle=f"{IDLE:g}s", interval=f"{INTERVAL:g}s")
    log = tmp_path / "run.log"
    proc = await start_service(config, log)
    try:
        await _watchdog_connected(admin, proc, log)
        assert await stop_process(proc, signal.SIGINT, timeout=5) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
