"""Mass healing: 900 idle sessions past their threshold, one sweep, against the seed's own kill
SQL run by psql on the same sessions, in the same run.

A child process holds the victims. Each round, on one server, in turns (the order rotates
between rounds):

  sweep    the real ``watchdog.service.sweep.sweep_target`` of each checkout given by
           --watchdog-tree (default: this one), run by bench/heal_probe.py on the watchdog's
           own connection (role ``watchdog``, least privilege), warmed as a service's is, with
           the seed's rules (thresholds 1 s) and its audit log on disk (not tmpfs) so every
           fsync is real. Timed from the sweep's start until the last audit record is
           fsynced, every victim confirmed gone.
  psql     what a DBA without pg-watchdog would run from cron: the cluster's own psql, a fresh
           process, role ``watchdog``, one statement with the seed's rules in SQL (idle past
           the threshold, not superusers, not the excluded applications, client backends
           only). Timed from psql's start until the last victim is gone from
           pg_stat_activity (polled every millisecond once psql has exited).

The server logs every statement of role ``watchdog`` with its duration, which is where the
statement counts and the ACT statement's server time come from. The ratio is each sweep's
total over the psql figure of the same round; the summary gives its median and [min-max].

    .venv/bin/python bench/mass_heal.py [--major 18] [--victims 900] [--rounds 5]
        [--watchdog-tree DIR ...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from benchlib import REPO, Holder, log_entries, machine, raise_nofile, setup_roles, table

from watchdog.commands.demo.tempcluster import TempCluster, start_cluster
from watchdog.pg import queries

THRESHOLD = 1.0
APP = "bench-victim"
AUDIT_DIR = Path("/var/tmp")  # on disk: fsync must cost what it costs in production
PROBE = Path(__file__).resolve().with_name("heal_probe.py")

# The seed's rules (policies/default.yaml), thresholds scaled down to THRESHOLD.
POLICY = """
targets: [{{name: bench, dsn: "{dsn}"}}]
exclude:
  superusers: true
  applications: ["pg_dump*", "pg_basebackup", "psql"]
  listeners: true
  member_of: [rds_superuser, azure_pg_admin, cloudsqlsuperuser]
policies:
  - {{name: idle, state: idle, longer_than: {threshold}s}}
  - name: idle-in-transaction
    state: [idle in transaction, idle in transaction (aborted)]
    longer_than: {threshold}s
limits: {{max_per_sweep: {victims}}}
audit: {{path: "{audit}"}}
"""

# The same rules as one statement, as a DBA would write them for cron.
SEED_KILL_SQL = """
SELECT count(pg_terminate_backend(a.pid))
FROM pg_stat_activity a
JOIN pg_roles r ON r.oid = a.usesysid
WHERE a.backend_type = 'client backend'
  AND a.pid <> pg_backend_pid()
  AND NOT r.rolsuper
  AND a.application_name NOT LIKE 'pg\\_dump%'
  AND a.application_name NOT IN ('pg_basebackup', 'psql')
  AND a.state IN ('idle', 'idle in transaction', 'idle in transaction (aborted)')
  AND a.state_change < now() - interval '1 second'
"""  # THRESHOLD


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


async def count_left(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", APP
        ))
    finally:
        await conn.close()


def one_sweep(pg: TempCluster, tree: Path, victims: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pgwd-bench-audit-", dir=AUDIT_DIR) as audit_dir:
        path = Path(audit_dir) / "policies.yaml"
        path.write_text(POLICY.format(dsn=pg.dsn("watchdog"), threshold=f"{THRESHOLD:g}",
                                      victims=victims, audit=Path(audit_dir) / "audit.jsonl"))
        child = subprocess.Popen([sys.executable, str(PROBE), str(tree), str(path)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdin is not None and child.stdout is not None
        try:
            if child.stdout.readline().strip() != "ready":
                raise SystemExit(f"heal_probe.py failed for {tree}")
            time.sleep(THRESHOLD + 0.2)
            offset = pg.log_path.stat().st_size
            child.stdin.write("go\n")
            child.stdin.flush()
            result: dict[str, Any] = json.loads(child.stdout.readline())
        finally:
            child.stdin.close()
            child.wait(60)
    result["left"] = asyncio.run(count_left(pg.dsn()))
    time.sleep(0.3)  # let the server write its last log lines
    result["counts"], durations = statements(pg, offset)
    result["act_server"] = durations.get("ACT", 0.0)
    return result


async def psql_reference(pg: TempCluster) -> dict[str, Any]:
    """The seed's kill SQL by a fresh psql, until the last victim is gone."""
    admin = await asyncpg.connect(pg.dsn())
    try:
        await asyncio.sleep(THRESHOLD + 0.2)
        cmd = [str(pg.bindir / "psql"), "-XAtq", "-h", pg.host, "-p", str(pg.port),
               "-U", "watchdog", "-d", "postgres", "-c", SEED_KILL_SQL]
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        psql_done = time.perf_counter()
        if proc.returncode != 0:
            raise SystemExit(f"psql failed: {err.decode(errors='replace').strip()}")
        while await admin.fetchval(  # noqa: ASYNC110 - polling the server is the point
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", APP
        ):
            await asyncio.sleep(0.001)
        end = time.perf_counter()
        return {"terminated": int(out), "psql": (psql_done - start) * 1000,
                "total": (end - start) * 1000}
    finally:
        await admin.close()


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return (f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-"
            f"{fmt.format(max(values))}]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--victims", type=int, default=900)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--watchdog-tree", type=Path, action="append", dest="trees",
                   help="a checkout of pg-watchdog to measure (repeat to compare; default: this)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    trees = [t.resolve() for t in a.trees or [REPO]]
    raise_nofile(a.victims + 1024)
    runs: list[dict[str, Any]] = []
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
            ways: list[Path | None] = [*trees, None]  # None: psql
            for r in range(a.rounds):
                turn = ways[r % len(ways):] + ways[: r % len(ways)]
                for way in turn:
                    with Holder(pg.dsn("app"), a.victims, APP):
                        if way is None:
                            res = asyncio.run(psql_reference(pg))
                        else:
                            res = one_sweep(pg, way, a.victims)
                    runs.append({"round": r + 1, "way": "psql" if way is None else str(way),
                                 **res})
                print(f"round {r + 1}/{a.rounds} done", flush=True)
        finally:
            pg.cleanup()
    psql = {x["round"]: x["total"] for x in runs if x["way"] == "psql"}
    for x in runs:
        x["ratio"] = x["total"] / psql[x["round"]]
    if a.json:
        print(json.dumps({"machine": about, "runs": runs}, indent=1))
        return
    print()
    print(about)
    print(f"{a.victims} idle sessions past a {THRESHOLD:g}s threshold; times in ms, median "
          f"[min-max] over {a.rounds} rounds; ratio: total / psql's total in the same round "
          "(target <= 1.0x)")
    rows = []
    for way in [str(t) for t in trees] + ["psql"]:
        mine = [x for x in runs if x["way"] == way]

        def col(key: str, rs: list[dict[str, Any]] = mine) -> str:
            return spread([x[key] for x in rs]) if all(key in x for x in rs) else "-"

        name = "psql (seed SQL)" if way == "psql" else f"sweep {Path(way).name}"
        counts = "-"
        if way != "psql":
            c = mine[-1]["counts"]
            kinds = ("SNAPSHOT", "ACT", "STILL_THERE")
            counts = "/".join(str(c.get(k, 0)) for k in kinds)
            counts += f"/{sum(c.values()) - sum(c.get(k, 0) for k in kinds)}"
        rows.append([
            name, col("terminated"), col("left") if way != "psql" else "0", col("look"),
            col("decide"), col("build"), col("to_intents"), col("intents"), col("act"),
            col("act_server"), col("to_final"), col("final"), col("psql"), col("total"),
            spread([x["ratio"] for x in mine], "{:.2f}x"), counts,
        ])
    print(table(
        ["way", "terminated", "left", "look", "decide", "intents built", "(start to intents)",
         "intents written",
         "ACT+confirm", "(ACT on server)", "records built", "records written", "psql ran",
         "total", "ratio", "statements S/A/C/other"],
        rows,
    ))


if __name__ == "__main__":
    main()
