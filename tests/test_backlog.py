"""A backlog bigger than limits.max_per_sweep heals in back-to-back sweeps, not one batch per
interval: 1,000 victims at max_per_sweep 200 and a 30 s interval, under the real `run`
(real APScheduler), are all terminated within seconds. Figures: bench/backlog.py."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

import pytest
from conftest import MAJORS, MakeCluster
from daemon import Daemon
from faults import alive, by_pid, check_log, close_all, open_victims, pids_of, read_records
from helpers import wait_for
from scenario import setup_roles

VICTIMS = 1000
PER_SWEEP = 200


@pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
async def test_1000_victims_at_200_per_sweep_all_die_within_seconds(
    major: int, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    c = make_cluster(major, max_connections=VICTIMS + 50, settings={"shared_buffers": "32MB"})
    setup_roles(c)
    audit = tmp_path / "audit.jsonl"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"""
targets: [{{name: main, dsn: "{c.dsn("watchdog")}", interval: 30s}}]
policies: [{{name: idle, state: idle, longer_than: 1s, users: [app]}}]
limits: {{max_per_sweep: {PER_SWEEP}}}
audit: {{path: "{audit}"}}
"""
    )
    victims = await open_victims(c, VICTIMS)
    pids = set(pids_of(victims))
    await asyncio.sleep(1.2)  # all past the threshold before the first sweep
    try:
        with Daemon(cfg) as d:
            await wait_for(lambda: read_records(audit), timeout=60, what="the first kill")
            # One batch per interval would take 4 more intervals (2 minutes) for the rest.
            await wait_for(
                lambda: pids <= set(by_pid(read_records(audit))),
                timeout=20,
                interval=0.1,
                what=f"all {VICTIMS} victims recorded",
            )
            assert d.stop() == 0
    finally:
        close_all(victims)
    records = read_records(audit)
    check_log(records)
    assert {r["pid"]: r["outcome"] for r in records} == dict.fromkeys(pids, "terminated")
    assert await alive(c, pids) == set()
    ts = sorted(datetime.fromisoformat(r["ts"].replace("Z", "+00:00")) for r in records)
    print(f"first kill to last: {(ts[-1] - ts[0]).total_seconds():.2f} s")
    assert "maximum number of running instances" not in d.log()
