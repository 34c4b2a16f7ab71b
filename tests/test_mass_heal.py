"""Mass healing: 500 idle sessions past their threshold are terminated by one sweep, with one
signalling statement (counted in the server's own log, log_statement = 'all'), and audited."""

from __future__ import annotations

import asyncio
import itertools
import re
from pathlib import Path

import asyncpg
import pytest
from conftest import MAJORS, MakeCluster
from helpers import connect

from watchdog import queries
from watchdog.act import CONFIRM_WITHIN
from watchdog.audit import AuditLog
from watchdog.config import load_config
from watchdog.connect import connect as watchdog_connect
from watchdog.connect import server_address
from watchdog.sweep import sweep_target
from watchdog.tempcluster import TempCluster

VICTIMS = 500
_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", re.MULTILINE)


def statements_of(log: str, application: str) -> list[str]:
    """Statements ``application`` ran, from a log_statement = 'all' server log."""
    starts = [m.start() for m in _ENTRY.finditer(log)] + [len(log)]
    entries = [log[a:b] for a, b in itertools.pairwise(starts)]
    marker = re.compile(rf"\] {re.escape(application)} LOG:  (?:statement|execute [^:]*):")
    return [e for e in entries if marker.search(e)]


async def _open_victims(pg: TempCluster, n: int, batch: int = 50) -> list[asyncpg.Connection]:
    conns: list[asyncpg.Connection] = []
    for start in range(0, n, batch):
        opened = await asyncio.gather(
            *(connect(pg, "app", application_name="leak") for _ in range(min(batch, n - start)))
        )
        conns += opened
    await asyncio.gather(*(c.execute("SELECT 1") for c in conns))
    return conns


@pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
async def test_500_victims_die_in_one_sweep_with_one_signalling_statement(
    major: int, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    pg = make_cluster(major, max_connections=VICTIMS + 30, settings={"log_statement": "'all'"})
    pg.psql("CREATE ROLE app LOGIN")
    path = tmp_path / "policies.yaml"
    path.write_text(
        f"""
targets:
  - name: main
    dsn: {pg.dsn()}
policies:
  - name: idle
    state: idle
    longer_than: 1s
limits:
  max_per_sweep: {VICTIMS}
audit:
  path: {tmp_path / "audit.jsonl"}
"""
    )
    config = load_config(str(path))
    conns = await _open_victims(pg, VICTIMS)
    watcher = await watchdog_connect(config.targets[0])
    try:
        await asyncio.sleep(1.2)
        offset = pg.log_path.stat().st_size
        report = await sweep_target(
            watcher,
            await server_address(watcher),
            config,
            config.targets[0],
            AuditLog(config.audit.path),
        )
        remaining = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'leak'"
        )
    finally:
        for conn in conns:
            conn.terminate()
        await watcher.close()

    assert [o.outcome for o in report.outcomes] == ["terminated"] * VICTIMS
    assert remaining == 0
    lines = config.audit.path.read_text().splitlines()
    assert len(lines) == VICTIMS
    with pg.log_path.open() as f:
        f.seek(offset)
        log = f.read()
    ran = statements_of(log, "pg-watchdog")
    signalling = [s for s in ran if "pg_terminate_backend" in s]
    assert len(signalling) == 1, signalling
    assert queries.ACT.strip().splitlines()[0] in signalling[0]
    # Besides it: the snapshot and the confirmation looks, nothing per victim. How many looks
    # depends on how fast the server reaps 500 backends (every 25 ms for at most 2 s).
    still_there = queries.STILL_THERE.strip().splitlines()[0]
    looks = [s for s in ran if still_there in s]
    assert 1 <= len(looks) <= CONFIRM_WITHIN / 0.025 + 10, len(looks)
    assert len(ran) - len(looks) < 10, ran  # how fast: bench/mass_heal.py
