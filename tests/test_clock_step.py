"""A step of the wall clock neither stalls nor bunches sweeps: the real `pg-watchdog run`
under libfaketime (monotonic clock left alone) has its wall clock stepped back one hour,
then forward one hour, and after each step an idle session still dies on time.

Lateness here is read from the server's clock (the record's age_s), which libfaketime does
not touch; the bound is generous (load), the precise figures are in bench/clock_step.py.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from daemon import Daemon, audit_records, write_config
from helpers import connect, wait_for
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
THRESHOLD = 3.0
# APScheduler's wait on today's code after a backward step: an hour. Anything near the
# threshold, even on a loaded machine, means the step did not stall the sweeps.
GENEROUS = 20.0


def faketime_env(control: Path) -> dict[str, str]:
    """Environment for a process whose wall clock follows the offset written in ``control``."""
    if not Path(LIBFAKETIME).exists():
        pytest.fail(f"{LIBFAKETIME} missing: apt-get install faketime", pytrace=False)
    control.write_text("+0\n")
    return {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(control),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def _ts(text: object) -> datetime:
    return datetime.fromisoformat(str(text).replace("Z", "+00:00"))


async def _killed_on_time(cluster: TempCluster, audit: Path, app: str) -> dict[str, object]:
    conn = await connect(cluster, "app", application_name=app)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")

        def recorded() -> bool:
            return any(r["pid"] == pid for r in audit_records(audit))

        await wait_for(recorded, timeout=THRESHOLD + 60, interval=0.1, what=f"{app} killed")
    finally:
        conn.terminate()
    record = next(r for r in audit_records(audit) if r["pid"] == pid)
    assert record["outcome"] == "terminated", record
    return record


async def test_sweeps_keep_time_across_wall_clock_steps(pg: TempCluster, tmp_path: Path) -> None:
    setup_roles(pg)
    control = tmp_path / "faketime.rc"
    audit = tmp_path / "audit.jsonl"
    cfg = write_config(tmp_path / "p.yaml", pg, idle=f"{THRESHOLD:g}s", interval="2s", audit=audit)
    with Daemon(cfg, faketime_env(control)) as d:
        await wait_for(lambda: "connected to" in d.log(), timeout=30, what="connected")
        lateness = {"before": await _killed_on_time(pg, audit, "before")}
        for label, offset in (("back 1h", "-1h"), ("forward 1h", "+0")):
            control.write_text(f"{offset}\n")
            lateness[label] = await _killed_on_time(pg, audit, label.replace(" ", "-"))
        assert d.alive(), d.log()
        assert d.stop() == 0, d.log()
    # The steps really reached the process: its records' own timestamps moved with them.
    skew = {
        label: (_ts(r["ts"]) - _ts(r["state_change"])).total_seconds()
        for label, r in lateness.items()
    }
    assert abs(skew["back 1h"] + 3600) < 120 and abs(skew["forward 1h"]) < 120, skew
    for label, record in lateness.items():
        late = float(record["age_s"]) - THRESHOLD  # type: ignore[arg-type]
        assert late < GENEROUS, (label, record)
    assert "Traceback" not in d.log(), d.log()
