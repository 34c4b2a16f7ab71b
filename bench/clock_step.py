"""Wall-clock steps: how late is a kill after the system clock steps back or forward?

The real ``pg-watchdog run`` under libfaketime (monotonic clock left alone; Debian
package ``faketime``), interval 2 s, idle sessions of role app past 3 s. The wall clock
is stepped -1 h, then +1 h (back to real time), then +1 h more; after each step a
session goes idle. Lateness = the record's age_s (the server's clock, never faked)
minus the threshold: how long after its crossing the sweep that killed it looked.

    .venv/bin/python bench/clock_step.py [--major 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from benchlib import machine, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import Daemon, write_config
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster, start_cluster

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
THRESHOLD = 3.0
STEPS = (("none", "+0"), ("back 1 h", "-1h"), ("forward 1 h", "+0"), ("forward 1 h more", "+1h"))


def _record(audit: Path, pid: int) -> dict[str, Any] | None:
    if not audit.exists():
        return None
    for line in audit.read_text().splitlines():
        r = json.loads(line)
        if r["pid"] == pid:
            return dict(r)
    return None


async def _kill_after(pg: TempCluster, audit: Path) -> dict[str, Any]:
    victim = await asyncpg.connect(pg.dsn("app"), timeout=10)
    pid = await victim.fetchval("SELECT pg_backend_pid()")
    deadline = time.monotonic() + 120
    try:
        while (record := _record(audit, pid)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {pid} not killed within 120 s")
            await asyncio.sleep(0.05)
    finally:
        victim.terminate()
    return record


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--major", type=int, default=15)
    args = parser.parse_args()
    pg = start_cluster(args.major)
    try:
        setup_roles(pg)
        with tempfile.TemporaryDirectory() as tmp:
            control, audit = Path(tmp) / "faketime.rc", Path(tmp) / "audit.jsonl"
            control.write_text("+0\n")
            env = {
                "LD_PRELOAD": LIBFAKETIME,
                "FAKETIME_TIMESTAMP_FILE": str(control),
                "FAKETIME_NO_CACHE": "1",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            }
            cfg = write_config(Path(tmp) / "p.yaml", pg, idle="3s", interval="2s", audit=audit)
            rows = []
            with Daemon(cfg, env) as d:
                for _ in range(600):
                    if "connected to" in d.log():
                        break
                    await asyncio.sleep(0.1)
                for label, offset in STEPS:
                    control.write_text(f"{offset}\n")
                    r = await _kill_after(pg, audit)
                    rows.append((label, offset, r["outcome"], f"{r['age_s'] - THRESHOLD:.2f}"))
                d.stop()
        print(machine(pg))
        print(table(["step", "faketime offset", "outcome", "lateness (s)"], rows))
    finally:
        pg.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
