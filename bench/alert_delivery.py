"""Alert delivery: do the acted events of a storm reach a Sentry that answers slowly?

The real ``pg-watchdog run`` (a subprocess, with the real sentry-sdk) watches a fresh
server; this process opens a new idle session of role app every ``--arrival`` seconds for
``--storm`` seconds, and the policy terminates sessions idle longer than 1 s (interval 1 s,
so sweeps run near the 250 ms floor). The Sentry endpoint is the test suite's
(tests/sentry_endpoint.py), answering each request ``delay`` seconds late.

Per delay it prints the kills (audit log), the acting sweeps, the acted events that arrived
and their sessions, the check-ins captured during the storm, and how long after the storm
the last acted event arrived (the SDK sends one request at a time).

    .venv/bin/python bench/alert_delivery.py [--major 15] [--delays 0.1,0.4,0.8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from benchlib import REPO, machine, setup_roles, table

sys.path.insert(0, str(REPO / "tests"))
from sentry_endpoint import SentryEndpoint

from watchdog.commands.demo.tempcluster import TempCluster, start_cluster

ACTED = re.compile(r"^terminated (\d+) sessions? on main \(policy idle\)")
POLICY = """
targets:
  - name: main
    dsn: {dsn}
    interval: 1s
exclude:
  superusers: true
policies:
  - name: idle
    state: idle
    longer_than: 1s
    users: [app]
audit:
  path: {audit}
alerts:
  sentry:
    dsn: {sentry}
    environment: bench
"""


def kills(audit: Path) -> list[dict[str, object]]:
    if not audit.exists():
        return []
    records = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    return [r for r in records if r["outcome"] == "terminated"]


async def poll(done: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``done()`` held, polled every 0.2 s; None after ``timeout``."""
    start = time.monotonic()
    for _ in range(int(timeout / 0.2) + 1):
        if done():
            return time.monotonic() - start
        await asyncio.sleep(0.2)
    return None


def acted(sentry: SentryEndpoint) -> tuple[int, int]:
    counts = [int(m[1]) for e in sentry.events() if (m := ACTED.match(e.get("message", "")))]
    return len(counts), sum(counts)


async def one_storm(pg: TempCluster, delay: float, storm: float, arrival: float,
                    drain: float) -> list[object]:
    with tempfile.TemporaryDirectory() as tmp, SentryEndpoint(delay=delay) as sentry:
        audit = Path(tmp) / "audit.jsonl"
        config = Path(tmp) / "p.yaml"
        config.write_text(POLICY.format(dsn=pg.dsn("watchdog"), audit=audit, sentry=sentry.dsn))
        log = (Path(tmp) / "run.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watchdog", "run", "-c", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=log)
        victims: list[asyncpg.Connection] = []
        try:
            sentry.wait_for(lambda: sentry.checkins(), timeout=60)
            began = datetime.now(UTC)
            end = time.monotonic() + storm
            while time.monotonic() < end:
                victims.append(await asyncpg.connect(
                    pg.dsn("app"), server_settings={"application_name": f"storm-{len(victims)}"}))
                await asyncio.sleep(arrival)
            ended, ended_at = datetime.now(UTC), time.monotonic()
            await poll(lambda: len(kills(audit)) >= len(victims), 30)
            done = kills(audit)
            want = (len({r["sweep"] for r in done}), len(done))
            await poll(lambda: acted(sentry) == want, drain)
            last = time.monotonic() - ended_at if acted(sentry) == want else None
            during = [
                i for e in list(sentry.envelopes) for i in e.items
                if i.type == "check_in" and began <= datetime.fromisoformat(e.headers["sent_at"])
                <= ended
            ]
            got = acted(sentry)
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
            log.close()
            for conn in victims:
                conn.terminate()
    return [f"{delay:g}", len(victims), want[1], want[0], got[0], got[1], len(during),
            "-" if last is None else f"{last:.1f}"]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--major", type=int, default=15)
    parser.add_argument("--delays", default="0.1,0.4,0.8")
    parser.add_argument("--storm", type=float, default=20.0)
    parser.add_argument("--arrival", type=float, default=0.3)
    parser.add_argument("--drain", type=float, default=120.0)
    args = parser.parse_args()
    pg = start_cluster(args.major, max_connections=40)
    try:
        setup_roles(pg)
        print(machine(pg))
        print(f"storm {args.storm:g} s, a victim every {args.arrival:g} s, interval 1 s")
        rows = [await one_storm(pg, float(d), args.storm, args.arrival, args.drain)
                for d in args.delays.split(",")]
        print(table(("delay s", "victims", "kills", "acting sweeps", "events arrived",
                     "their sessions", "check-ins in storm", "last event after storm s"),
                    rows))
    finally:
        pg.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
