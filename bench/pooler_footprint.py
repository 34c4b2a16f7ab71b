"""Service footprint behind a big PgBouncer: the daemon's memory and threads, for the unit's
MemoryMax= and TasksMax=.

One throwaway PostgreSQL, one PgBouncer (session pooling) in front of it, and a child holding
--size idle clients through it: PostgreSQL has N backends and PgBouncer 2N sockets. The real
daemon (``python -m watchdog run``) watches the target every 250 ms with a policy whose
threshold every pooled backend is past but whose users none of them is (candidates, never
victims), so SHOW SOCKETS runs as often as the watchdog allows (once a second). Metrics are
scraped and Sentry (a local endpoint) is on, so their threads are counted too. Reads are
counted in PgBouncer's log; VmRSS, VmHWM and Threads come from /proc/PID/status.

    .venv/bin/python bench/pooler_footprint.py [--major 18] [--size 2000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlib import REPO, Holder, machine, raise_nofile, setup_roles, table

sys.path.insert(0, str(REPO / "tests"))

from sentry_endpoint import SentryEndpoint
from temppooler import start_pooler

from watchdog.commands.demo.tempcluster import free_port, start_cluster

CONFIG = """\
targets:
  - name: main
    dsn: {dsn}
    interval: 250ms
    poolers: [{{name: pgb1, dsn: '{pooler}'}}]
policies:
  - name: watch-only
    state: idle
    longer_than: 1s
    users: [nobody]
audit: {{path: {audit}}}
alerts: {{sentry: {{dsn: '{sentry}'}}}}
metrics: {{listen: '127.0.0.1:{port}'}}
"""


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--size", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    n = a.size
    raise_nofile(3 * n + 1024)
    with tempfile.TemporaryDirectory(prefix="pgwd-bench-") as tmp, SentryEndpoint() as sentry:
        Path(tmp).chmod(0o711)
        pg = start_cluster(a.major, max_connections=n + 20, base_dir=Path(tmp),
                           settings={"shared_buffers": "16MB", "max_locks_per_transaction": "16"})
        try:
            setup_roles(pg)
            pooler = start_pooler(pg, pool_mode="session", base_dir=Path(tmp), settings={
                "default_pool_size": str(n + 10), "max_client_conn": str(n + 100),
                "max_db_connections": "0", "verbose": "2"})
            try:
                with Holder(pooler.dsn("app", "postgres"), n, "bench-idle"):
                    port = free_port()
                    cfg = Path(tmp) / "policies.yaml"
                    cfg.write_text(CONFIG.format(dsn=pg.dsn("watchdog"), pooler=pooler.dsn(),
                                                 audit=Path(tmp) / "audit.jsonl",
                                                 sentry=sentry.dsn, port=port))
                    result = run(cfg, port, pooler.log_path, a.seconds)
                about = machine(pg)
            finally:
                pooler.cleanup()
        finally:
            pg.cleanup()
    result = {"clients": n, **result}
    if a.json:
        print(json.dumps(result))
        return
    print(about)
    print(table(list(result), [list(result.values())]))


def run(cfg: Path, port: int, pgb_log: Path, seconds: float) -> dict[str, object]:
    log = cfg.with_suffix(".log")
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "watchdog", "run", "-c", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        time.sleep(3)
        first = status(proc.pid)
        samples = []
        reads_at = pgb_log.read_text(errors="replace").count("got admin query: SHOW SOCKETS")
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            samples.append(status(proc.pid))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                r.read()
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        reads = pgb_log.read_text(errors="replace").count("got admin query: SHOW SOCKETS")
        last = status(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {
        "sockets_reads_per_s": round((reads - reads_at) / elapsed, 2),
        "rss_start_mb": round(first["VmRSS"] / 1024, 1),
        "rss_end_mb": round(last["VmRSS"] / 1024, 1),
        "peak_mb": round(last["VmHWM"] / 1024, 1),
        "threads_max": max(s["Threads"] for s in samples),
    }


if __name__ == "__main__":
    main()
