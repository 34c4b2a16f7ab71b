"""Backlog: N idle sessions past their threshold, more than limits.max_per_sweep, under the real
`pg-watchdog run` (APScheduler and all). How long from the first kill to the last?

A child process holds the victims (role ``app``), idle past the 1 s threshold before the
service starts; the service (least-privilege role ``watchdog``) runs with the given
max_per_sweep and interval, its audit log on disk. Figures come from the audit log: the
``ts`` of the first and last record, the number of sweeps (distinct ``sweep`` ids), and the
time from the service's start to the last record. With one batch per interval the backlog
would take (N / max_per_sweep - 1) intervals after the first kill.

    .venv/bin/python bench/backlog.py [--major 18] [--victims 1000] [--per-sweep 200,50]
                                      [--interval 30] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import REPO, Holder, machine, median, raise_nofile, setup_roles, table

from watchdog.commands.demo.tempcluster import TempCluster, start_cluster

THRESHOLD = 1.0
APP = "bench-victim"
AUDIT_DIR = Path("/var/tmp")  # on disk: fsync must cost what it costs in production


def _ts(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00")).timestamp()


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def one_run(pg: TempCluster, victims: int, per_sweep: int, interval: float) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="pgwd-bench-backlog-", dir=AUDIT_DIR) as t,
        Holder(pg.dsn("app"), victims, APP),
    ):
        tmp = Path(t)
        audit, cfg = tmp / "audit.jsonl", tmp / "policies.yaml"
        cfg.write_text(
            f"""
targets: [{{name: bench, dsn: "{pg.dsn("watchdog")}", interval: {interval:g}s}}]
policies: [{{name: idle, state: idle, longer_than: {THRESHOLD:g}s, applications: [{APP}]}}]
limits: {{max_per_sweep: {per_sweep}}}
audit: {{path: "{audit}"}}
"""
        )
        time.sleep(THRESHOLD + 0.2)  # every victim past the threshold before the first sweep
        log = (tmp / "run.log").open("wb")
        started = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "watchdog", "run", "-c", str(cfg)],
            stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
        )
        # Generous: one batch per interval, plus a minute.
        deadline = time.monotonic() + math.ceil(victims / per_sweep) * interval + 60
        try:
            while len(records := _records(audit)) < victims and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
        stamps = sorted(_ts(r) for r in records)
        text = (tmp / "run.log").read_text(errors="replace")
        return {
            "victims": victims,
            "per_sweep": per_sweep,
            "interval_s": interval,
            "terminated": sum(r["outcome"] == "terminated" for r in records),
            "sweeps": len({r["sweep"] for r in records}),
            "first_to_last_s": round(stamps[-1] - stamps[0], 3) if stamps else None,
            "start_to_last_s": round(stamps[-1] - started, 3) if stamps else None,
            "one_batch_per_interval_s": (math.ceil(victims / per_sweep) - 1) * interval,
            "skipped_runs_logged": text.count("maximum number of running instances"),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--victims", type=int, default=1000)
    p.add_argument("--per-sweep", default="200,50", help="max_per_sweep values, comma-separated")
    p.add_argument("--interval", type=float, default=30.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    raise_nofile(a.victims + 1024)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pgwd-bench-") as t:
        base = Path(t)
        base.chmod(0o711)
        pg = start_cluster(
            a.major,
            max_connections=a.victims + 50,
            settings={"shared_buffers": "32MB", "max_locks_per_transaction": "16"},
            base_dir=base,
        )
        try:
            setup_roles(pg)
            about = machine(pg)
            for per_sweep in (int(x) for x in a.per_sweep.split(",")):
                for _ in range(a.repeat):
                    runs.append(one_run(pg, a.victims, per_sweep, a.interval))
        finally:
            pg.cleanup()
    if a.json:
        print(json.dumps({"machine": about, "runs": runs}))
        return
    print(about)
    print(
        f"{a.victims} idle sessions past a {THRESHOLD:g}s threshold when `pg-watchdog run` "
        f"starts; interval {a.interval:g}s; times from the audit records"
    )
    rows = [
        [
            r["per_sweep"], r["terminated"], r["sweeps"], f"{r['first_to_last_s']:.2f}",
            f"{r['start_to_last_s']:.2f}", f"{r['one_batch_per_interval_s']:g}",
            r["skipped_runs_logged"],
        ]
        for r in runs
    ]
    print(
        table(
            ["max_per_sweep", "terminated", "sweeps", "first->last kill s", "start->last s",
             "one batch per interval s", "skipped runs"],
            rows,
        )
    )
    for per_sweep in sorted({r["per_sweep"] for r in runs}, reverse=True):
        spans = [r["first_to_last_s"] for r in runs if r["per_sweep"] == per_sweep]
        print(f"max_per_sweep {per_sweep}: median first->last kill {median(spans):.2f} s")


if __name__ == "__main__":
    main()
