"""Punctual scheduling: with a 30 s interval and a 2 s idle threshold, the real Service kills a
session at its threshold crossing, whenever the session went idle, not at the next interval.
How punctual (the lateness figures) is bench/punctuality.py's to say."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import connect, wait_for

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import load_config
from watchdog.pg import queries
from watchdog.service.scheduler import Service

THRESHOLD = 2.0
INTERVAL = 30.0
# Far below the interval, far above any lateness under load: a kill by this bound came from
# punctual scheduling, never from the regular 30 s sweep.
GENEROUS = INTERVAL / 3


def _write_config(pg: TempCluster, tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(
        f"""
targets:
  - name: main
    dsn: {pg.dsn()}
    interval: {INTERVAL:g}s
policies:
  - name: idle
    state: idle
    longer_than: {THRESHOLD:g}s
audit:
  path: {tmp_path / "audit.jsonl"}
"""
    )
    return path


@asynccontextmanager
async def running_service(path: Path) -> AsyncIterator[Service]:
    service = Service(load_config(str(path)), str(path), dry_run=False)
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        service.stop.set()
        assert await asyncio.wait_for(task, 30) == 0
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _records(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _lateness(record: dict[str, Any]) -> float:
    """Seconds from the threshold crossing to the (confirmed) termination's audit record."""
    due = _ts(record["state_change"]) + timedelta(seconds=THRESHOLD)
    return (_ts(record["ts"]) - due).total_seconds()


async def _first_sweep_done(pg: TempCluster) -> None:
    admin = await connect(pg)
    try:

        async def swept() -> bool:
            # The statement's head: pg_stat_activity keeps only track_activity_query_size bytes.
            return bool(
                await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-watchdog'"
                    " AND state = 'idle' AND left(query, 120) = left($1, 120)",
                    queries.SNAPSHOT,
                )
            )

        await wait_for(swept, timeout=10, what="the service's first sweep")
    finally:
        await admin.close()


async def _killed(tmp_path: Path, apps: set[str], timeout: float) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}

    def done() -> bool:
        found.update({r["application_name"]: r for r in _records(tmp_path)})
        return apps <= found.keys()

    await wait_for(done, timeout=timeout, what=f"terminations of {sorted(apps)}")
    return found


@pytest.fixture
async def app_role(pg: TempCluster) -> str:
    pg.psql("DO $$ BEGIN CREATE ROLE app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    return "app"


async def test_session_going_idle_between_sweeps_dies_at_its_threshold_not_the_interval(
    pg: TempCluster, tmp_path: Path, app_role: str
) -> None:
    # Nothing is idle at the first sweep, so nothing is "due": the next regular sweep
    # would come 30 s later. The session must still die 2 s after it went idle.
    path = _write_config(pg, tmp_path)
    async with running_service(path):
        await _first_sweep_done(pg)
        late = await connect(pg, app_role, application_name="late")
        await late.execute("SELECT 1")
        record = (await _killed(tmp_path, {"late"}, timeout=INTERVAL + 5))["late"]
        await late.close()
    assert record["outcome"] == "terminated"
    assert record["age_s"] >= THRESHOLD
    assert 0 <= _lateness(record) < GENEROUS, record


async def test_idle_sessions_die_on_time_and_activity_restarts_the_clock(
    pg: TempCluster, tmp_path: Path, app_role: str
) -> None:
    early = await connect(pg, app_role, application_name="early")
    await early.execute("SELECT 1")  # idle from before the service starts
    busy = await connect(pg, app_role, application_name="busy")
    path = _write_config(pg, tmp_path)
    async with running_service(path):
        for _ in range(10):  # active every 0.3 s for 3 s: idle, but never for 2 s yet
            await busy.execute("SELECT 1")
            last_query = time.monotonic()
            await asyncio.sleep(0.3)
        records = await _killed(tmp_path, {"early", "busy"}, timeout=10)
        busy_alive_for = time.monotonic() - last_query
    for conn in (early, busy):
        await conn.close()
    for app in ("early", "busy"):
        assert records[app]["outcome"] == "terminated"
        assert records[app]["age_s"] >= THRESHOLD, records[app]
        assert 0 <= _lateness(records[app]) < GENEROUS, records[app]
    assert [r["application_name"] for r in _records(tmp_path)].count("busy") == 1
    assert busy_alive_for >= THRESHOLD
