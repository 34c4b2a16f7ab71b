"""Mass healing: 900 idle sessions past their threshold, one sweep. How long from the sweep's
start until the last audit record is fsynced, and how many statements it sent.

A child process holds the victims. The sweep is the real ``watchdog.sweep.sweep_target`` on
the watchdog's own connection (role ``watchdog``, least privilege), with its audit log on
disk (not tmpfs) so every fsync is real. The server logs every statement of role
``watchdog`` with its duration (``ALTER ROLE watchdog SET log_statement = 'all'``), which is
where the statement count and the ACT statement's server time come from. The reference row
is the floor: one bare ``pg_terminate_backend`` statement for all victims, then polling until
the last backend is gone (no audit, no race check).

    .venv/bin/python bench/mass_heal.py [--major 18] [--victims 900] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from benchlib import Holder, log_entries, machine, median, raise_nofile, setup_roles, table

from watchdog import queries
from watchdog.audit import AuditLog
from watchdog.config import load_config
from watchdog.connect import connect, server_address
from watchdog.sweep import sweep_target
from watchdog.tempcluster import TempCluster, start_cluster

THRESHOLD = 1.0
APP = "bench-victim"
AUDIT_DIR = Path("/var/tmp")  # on disk: fsync must cost what it costs in production


class TimedAudit(AuditLog):
    """The real audit log, noting when the intents and the final records reached the disk."""

    marks: dict[str, float]

    def write_intents(self, records: list[dict[str, Any]]) -> None:
        self.marks["intents_start"] = time.perf_counter()
        super().write_intents(records)
        self.marks["intents_done"] = time.perf_counter()

    def append(self, records: list[dict[str, Any]]) -> None:
        self.marks["append_start"] = time.perf_counter()
        super().append(records)
        self.marks["append_done"] = time.perf_counter()


def _kind(entry: str) -> str:
    for name in ("SNAPSHOT", "ACT", "STILL_THERE", "SERVER_ADDR", "TRY_LEAD"):
        first = getattr(queries, name).strip().splitlines()[0]
        if first in entry:
            return name
    return "other"


def statements(pg: TempCluster, offset: int) -> tuple[dict[str, int], dict[str, float]]:
    """Statements the watchdog ran after ``offset`` (by kind) and their server durations (ms)."""
    counts: dict[str, int] = {}
    durations: dict[str, float] = {}
    last = "other"
    for e in log_entries(pg.log_path, offset):
        if " pg-watchdog " not in e:
            continue
        if re.search(r"LOG:  (statement|execute [^:]*):", e):
            last = _kind(e)
            counts[last] = counts.get(last, 0) + 1
        elif m := re.search(r"LOG:  duration: ([\d.]+) ms", e):
            durations[last] = durations.get(last, 0.0) + float(m.group(1))
    return counts, durations


async def one_sweep(pg: TempCluster, tmp: Path, victims: int) -> dict[str, Any]:
    path = tmp / "policies.yaml"
    path.write_text(
        f"""
targets: [{{name: bench, dsn: "{pg.dsn("watchdog")}"}}]
policies: [{{name: idle, state: idle, longer_than: {THRESHOLD:g}s}}]
limits: {{max_per_sweep: {victims}}}
audit: {{path: "{tmp / "audit.jsonl"}"}}
"""
    )
    config = load_config(str(path))
    audit = TimedAudit(config.audit.path)
    audit.marks = {}
    conn = await connect(config.targets[0])
    try:
        server = await server_address(conn)
        # A held connection has long since made asyncpg introspect the int[] and timestamptz[]
        # types (two statements, once per connection): warm this one the same way.
        await conn.fetch(queries.STILL_THERE, [], [])
        await asyncio.sleep(THRESHOLD + 0.2)
        offset = pg.log_path.stat().st_size
        start = time.perf_counter()
        report = await sweep_target(conn, server, config, config.targets[0], audit)
        end = time.perf_counter()
    finally:
        await conn.close()
    left = await count_left(pg)
    await asyncio.sleep(0.3)  # let the server write its last log lines
    counts, durations = statements(pg, offset)
    m = audit.marks
    outcomes = [o.outcome for o in report.outcomes]
    records = len(config.audit.path.read_text().splitlines())
    return {
        "victims": victims,
        "terminated": outcomes.count("terminated"),
        "records": records,
        "left": left,
        "decide": (m["intents_start"] - start) * 1000,
        "intents": (m["intents_done"] - m["intents_start"]) * 1000,
        "act_confirm": (m["append_start"] - m["intents_done"]) * 1000,
        "act_server": durations.get("ACT", 0.0),
        "final": (m["append_done"] - m["append_start"]) * 1000,
        "total": (end - start) * 1000,
        "counts": counts,
    }


async def count_left(pg: TempCluster) -> int:
    conn = await asyncpg.connect(pg.dsn())
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", APP
            )
        )
    finally:
        await conn.close()


async def floor(pg: TempCluster) -> float:
    conn = await asyncpg.connect(pg.dsn())
    try:
        start = time.perf_counter()
        await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            APP,
        )
        while await conn.fetchval(  # noqa: ASYNC110 - polling the server is the point
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", APP
        ):
            await asyncio.sleep(0.005)
        return (time.perf_counter() - start) * 1000
    finally:
        await conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--victims", type=int, default=900)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    raise_nofile(a.victims + 1024)
    rows: list[list[object]] = []
    totals: list[float] = []
    with tempfile.TemporaryDirectory(prefix="pgwd-bench-") as t:
        base = Path(t)
        base.chmod(0o711)
        pg = start_cluster(
            a.major,
            max_connections=a.victims + 30,
            settings={"shared_buffers": "32MB", "max_locks_per_transaction": "16"},
            base_dir=base,
        )
        try:
            setup_roles(
                pg,
                "ALTER ROLE watchdog SET log_statement = 'all';"
                "ALTER ROLE watchdog SET log_min_duration_statement = 0;",
            )
            about = machine(pg)
            for i in range(a.repeat):
                with (
                    Holder(pg.dsn("app"), a.victims, APP),
                    tempfile.TemporaryDirectory(
                        prefix="pgwd-bench-audit-", dir=AUDIT_DIR
                    ) as audit_dir,
                ):
                    r = asyncio.run(one_sweep(pg, Path(audit_dir), a.victims))
                totals.append(r["total"])
                c = r["counts"]
                others = sum(c.values()) - sum(
                    c.get(k, 0) for k in ("SNAPSHOT", "ACT", "STILL_THERE")
                )
                rows.append(
                    [
                        f"sweep {i + 1}",
                        r["victims"],
                        r["terminated"],
                        r["records"],
                        r["left"],
                        f"{r['decide']:.0f}",
                        f"{r['intents']:.0f}",
                        f"{r['act_confirm']:.0f}",
                        f"{r['act_server']:.0f}",
                        f"{r['final']:.0f}",
                        f"{r['total']:.0f}",
                        "/".join(
                            str(n)
                            for n in (
                                c.get("SNAPSHOT", 0),
                                c.get("ACT", 0),
                                c.get("STILL_THERE", 0),
                                others,
                            )
                        ),
                    ]
                )
            with Holder(pg.dsn("app"), a.victims, APP):
                ref = asyncio.run(floor(pg))
            rows.append(
                [
                    "bare SQL floor",
                    a.victims,
                    a.victims,
                    "-",
                    0,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"{ref:.0f}",
                    "1 statement + polling",
                ]
            )
        finally:
            pg.cleanup()
    print()
    print(about)
    print(
        f"{a.victims} idle sessions past a {THRESHOLD:g}s threshold, one sweep each time; "
        "times in ms; target: total < 1000 ms"
    )
    print(
        table(
            [
                "run",
                "victims",
                "terminated",
                "audited",
                "left",
                "look+decide",
                "intent fsync",
                "ACT+confirm",
                "(ACT on server)",
                "final fsync",
                "total",
                "statements S/A/C/other",
            ],
            rows,
        )
    )
    print(f"median total: {median(totals):.0f} ms (sweep start -> last audit record fsynced)")


if __name__ == "__main__":
    main()
