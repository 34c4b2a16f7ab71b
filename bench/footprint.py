"""Footprint: the daemon's resident memory and CPU over 3,600 sweeps of 10 targets.

The real daemon (``python -m watchdog run``) watches 10 targets: 10 databases of one
throwaway server (each target its own database, so each holds its own leader lock), every
250 ms (the shortest interval allowed), with the default policies; a child process holds
100 idle sessions so every snapshot carries ~110 rows. Sweeps are counted from the server log
(``log_statement = 'all'`` for role ``watchdog``). RSS and CPU come from /proc/PID.

    .venv/bin/python bench/footprint.py [--major 18] [--sweeps 3600] [--targets 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchlib import REPO, Holder, machine, setup_roles, table

from watchdog.commands.demo.tempcluster import start_cluster
from watchdog.pg import queries

INTERVAL = "250ms"
SESSIONS = 100
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * _PAGE / 2**20


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


class SweepCounter:
    """Counts SNAPSHOT executions of the watchdog in the server log, incrementally."""

    def __init__(self, log: Path) -> None:
        self.f = log.open("rb")
        self.f.seek(0, os.SEEK_END)
        self.marker = queries.SNAPSHOT.strip().splitlines()[0].encode()
        self.count = 0
        self.rest = b""

    def update(self) -> int:
        data = self.rest + self.f.read()
        cut = data.rfind(b"\n") + 1
        self.count += data[:cut].count(self.marker)
        self.rest = data[cut:]
        return self.count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--sweeps", type=int, default=3600)
    p.add_argument("--targets", type=int, default=10)
    a = p.parse_args()
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="pgwd-bench-") as t:
        tmp = Path(t)
        tmp.chmod(0o711)
        pg = start_cluster(a.major, max_connections=SESSIONS + a.targets + 30, base_dir=tmp)
        try:
            setup_roles(pg, "ALTER ROLE watchdog SET log_statement = 'all';")
            pg.psql("".join(f"CREATE DATABASE db{i};\n" for i in range(a.targets)))
            about = machine(pg)
            targets = "\n".join(
                f'  - {{name: t{i}, dsn: "{pg.dsn("watchdog", f"db{i}")}", interval: {INTERVAL}}}'
                for i in range(a.targets)
            )
            policy = tmp / "policies.yaml"
            policy.write_text(
                f"""targets:
{targets}
policies:
  - {{name: idle, state: idle, longer_than: 10m}}
  - {{name: idle-in-transaction, state: [idle in transaction], longer_than: 5m}}
audit: {{path: "{tmp / "audit.jsonl"}"}}
"""
            )
            counter = SweepCounter(pg.log_path)
            with (
                Holder(pg.dsn("app"), SESSIONS, "bench-idle"),
                (tmp / "daemon.log").open("wb") as err,
            ):
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "watchdog", "run", "-c", str(policy)],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    cwd=REPO,
                )
                try:
                    start = time.monotonic()
                    step = a.sweeps // 10
                    next_mark = step
                    last_cpu, last_sweeps = 0.0, 0
                    while True:
                        n = counter.update()
                        if daemon.poll() is not None:
                            raise RuntimeError(f"daemon exited {daemon.returncode}")
                        if n >= next_mark:
                            cpu = cpu_s(daemon.pid)
                            per = (
                                (cpu - last_cpu) / (n - last_sweeps) * 1000
                                if n > last_sweeps
                                else 0
                            )
                            rows.append(
                                [
                                    n,
                                    f"{time.monotonic() - start:.0f}",
                                    f"{rss_mb(daemon.pid):.1f}",
                                    f"{cpu:.2f}",
                                    f"{per:.2f}" if n else "-",
                                ]
                            )
                            last_cpu, last_sweeps = cpu, n
                            next_mark += step
                            if n >= a.sweeps:
                                break
                        time.sleep(0.05)
                finally:
                    daemon.send_signal(signal.SIGTERM)
                    code = daemon.wait(30)
            log = (tmp / "daemon.log").read_text(errors="replace").splitlines()
        finally:
            pg.cleanup()
    print()
    print(about)
    print(
        f"`pg-watchdog run`: {a.targets} targets x interval {INTERVAL}, ~{SESSIONS + a.targets} "
        f"sessions per snapshot; target: RSS < 60 MB and flat; exit on SIGTERM: {code}"
    )
    print(
        table(["sweeps", "elapsed s", "RSS MB", "CPU s (total)", "CPU ms/sweep (since last)"], rows)
    )
    total_cpu = float(rows[-1][3])
    print(f"CPU per sweep overall: {total_cpu / int(rows[-1][0]) * 1000:.2f} ms (incl. start-up)")
    by_logger = Counter(
        f"{parts[3]} {parts[2]}" for line in log if len(parts := line.split(" ", 4)) > 4
    )
    print(f"daemon stderr: {len(log)} lines; by logger: {dict(by_logger.most_common(4))}")


if __name__ == "__main__":
    main()
