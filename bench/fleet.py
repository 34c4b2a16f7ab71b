"""Fleet: one real `pg-watchdog run` watching N real PostgreSQL servers, some of them sick.

N clusters (default 100; shared_buffers 8MB, max_connections 20, fsync off, autovacuum
off) are cloned from one initdb'd template (a copy and a start cost far less CPU than
initdb) and started 4 at a time. One ``python -m watchdog run`` watches all of them at
``--interval`` (30 s), terminating sessions of role ``app`` idle for more than 5 s.

A random quarter of the targets gets a staggered stream of idle victims (connect as app,
``SELECT pg_backend_pid()``, stay idle). After the first phase, 10 % of the servers are
SIGSTOPped (hung, sockets open) and another 10 % stopped outright; the victim stream goes
on on the healthy ones for a second phase of the same length.

Figures: watchdog CPU per target-sweep (/proc/PID/stat over the measured phases, divided by
the growth of ``pg_watchdog_sweeps_total``) and the share of one core it projects for 500
targets swept every 30 s; RSS (VmRSS) at start, after the first phase, at the end; the time
until every target was swept once; kill lateness on healthy targets (the audit record's
``ts`` minus ``state_change`` + 5 s) before and after the faults; sweeps missed on healthy
targets: gaps longer than the interval between the ``pg_watchdog_last_sweep_timestamp_seconds``
values seen by a scrape every 5 s (a scrape costs the watchdog CPU too: it is counted).

    .venv/bin/python bench/fleet.py [--targets 100] [--interval 30] [--phase S] [--json]
    .venv/bin/python bench/fleet.py --targets 20          # about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from benchlib import REPO, machine, pct, raise_nofile, setup_roles, table
from prometheus_client.parser import text_string_to_metric_families

from watchdog.commands.demo.tempcluster import TempCluster, free_port, start_cluster

THRESHOLD = 5.0
VICTIM_PERIOD = 8.0  # seconds between two victims on one victim target (jittered)
SCRAPE_EVERY = 5.0  # Prometheus scrapes every 15-30 s; each scrape costs the watchdog CPU
_TICK = os.sysconf("SC_CLK_TCK")
SETTINGS = {"shared_buffers": "8MB", "autovacuum": "off", "max_wal_size": "64MB",
            "log_min_messages": "warning"}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def clone(template: TempCluster, root: Path, i: int) -> TempCluster:
    """A copy of the stopped template's data directory, started on a port of its own."""
    basedir = root / f"pg{i:03d}"
    basedir.mkdir()
    c = TempCluster(major=template.major, bindir=template.bindir, basedir=basedir,
                    datadir=basedir / "data", port=free_port(), log_path=basedir / "postgresql.log",
                    os_user=template.os_user, password=template.password,
                    scram_secret=template.scram_secret)
    subprocess.run(["cp", "-a", str(template.datadir), str(c.datadir)], check=True)
    if template.os_user:
        subprocess.run(["chown", template.os_user, str(basedir)], check=True)
    for attempt in range(3):
        with (c.datadir / "postgresql.conf").open("a") as f:
            f.write(f"port = {c.port}\nunix_socket_directories = '{c.datadir}'\n")
        try:
            c.start()
            return c
        except Exception:
            if attempt == 2:
                raise
            c.port = free_port()
    raise AssertionError("unreachable")


def start_fleet(major: int, n: int, root: Path) -> list[TempCluster]:
    template = start_cluster(major, max_connections=20, settings=SETTINGS, base_dir=root)
    setup_roles(template)
    template.stop()
    try:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda i: clone(template, root, i), range(n)))
    finally:
        template.cleanup()


def write_policy(path: Path, fleet: list[TempCluster], interval: float, port: int,
                 audit: Path) -> None:
    targets = "\n".join(
        f'  - {{name: t{i:03d}, dsn: "{c.dsn("watchdog")}", interval: {interval:g}s}}'
        for i, c in enumerate(fleet)
    )
    path.write_text(f"""targets:
{targets}
exclude:
  superusers: true
policies:
  - {{name: idle, state: idle, longer_than: {THRESHOLD:g}s, users: [app]}}
audit: {{path: "{audit}"}}
metrics: {{listen: "127.0.0.1:{port}"}}
""")


def scrape(port: int) -> dict[str, dict[str, float]]:
    """metric name -> target -> value, for the per-target gauges and counters we read."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("pg_watchdog_sweeps_total", "pg_watchdog_last_sweep_timestamp_seconds",
                          "pg_watchdog_target_up"):
                out.setdefault(s.name, {})[s.labels["target"]] = s.value
    return out


@dataclass
class Watch:
    """What the scrapes saw: last-sweep times per target and sweep counts over time."""

    port: int
    seen: dict[str, list[float]] = field(default_factory=dict)  # target -> distinct last-sweep
    sweeps: dict[str, float] = field(default_factory=dict)
    load: list[tuple[float, float]] = field(default_factory=list)  # (time, 1-min load average)

    def poll(self) -> None:
        m = scrape(self.port)
        self.load.append((time.time(), os.getloadavg()[0]))
        self.sweeps = m.get("pg_watchdog_sweeps_total", {})
        for target, ts in m.get("pg_watchdog_last_sweep_timestamp_seconds", {}).items():
            seen = self.seen.setdefault(target, [])
            if not seen or ts != seen[-1]:
                seen.append(ts)

    def total(self) -> float:
        return sum(self.sweeps.values())


async def victims(fleet: dict[str, TempCluster], chosen: list[str], healthy: set[str],
                  stop: asyncio.Event, opened: list[tuple[str, int]],
                  conns: list[asyncpg.Connection]) -> None:

    async def stream(name: str) -> None:
        await asyncio.sleep(random.uniform(0, VICTIM_PERIOD))
        while not stop.is_set():
            if name in healthy:
                with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
                    conn = await asyncpg.connect(fleet[name].dsn("app"), timeout=10,
                                                 server_settings={"application_name": "victim"})
                    opened.append((name, await conn.fetchval("SELECT pg_backend_pid()")))
                    conns.append(conn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), VICTIM_PERIOD * random.uniform(0.75, 1.25))

    await asyncio.gather(*(stream(n) for n in chosen))


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def lateness(records: list[dict[str, Any]], healthy: set[str], fault_at: float
             ) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """Lateness of kills on healthy targets before and after the faults, and the worst five
    as (seconds after the faults, lateness)."""
    before, after, when = [], [], []
    for r in records:
        if r["outcome"] != "terminated" or r["target"] not in healthy:
            continue
        due = _ts(r["state_change"]) + THRESHOLD
        late = _ts(r["ts"]) - due
        (before if due < fault_at else after).append(late)
        when.append((round(due - fault_at, 1), round(late, 3)))
    return before, after, sorted(when, key=lambda w: -w[1])[:5]


def missed(seen: dict[str, list[float]], healthy: set[str], interval: float, end: float
           ) -> tuple[int, float]:
    """Sweeps missed (intervals with no sweep) on healthy targets, and the longest gap."""
    count, longest = 0, 0.0
    for target in healthy:
        stamps = [*seen.get(target, []), end]
        for a, b in itertools.pairwise(stamps):
            gap = b - a
            longest = max(longest, gap)
            if gap > interval + SCRAPE_EVERY:
                count += math.floor(gap / interval)
    return count, longest


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    return {"p50": round(pct(values, 50), 3), "p99": round(pct(values, 99), 3),
            "max": round(max(values), 3), "n": len(values)}


def spawn(policy: Path, err: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "watchdog", "run", "-c", str(policy)],
                            stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)


async def measure(a: argparse.Namespace, fleet: list[TempCluster], tmp: Path) -> dict[str, Any]:
    names = [f"t{i:03d}" for i in range(len(fleet))]
    by_name = dict(zip(names, fleet, strict=True))
    port = free_port()
    audit = tmp / "audit.jsonl"
    policy = tmp / "policies.yaml"
    write_policy(policy, fleet, a.interval, port, audit)
    rng = random.Random(a.seed)
    chosen = rng.sample(names, max(1, len(names) // 4))
    sick = rng.sample(names, 2 * max(1, len(names) // 10))
    paused, stopped = sick[: len(sick) // 2], sick[len(sick) // 2 :]
    healthy = set(names)
    opened: list[tuple[str, int]] = []
    conns: list[asyncpg.Connection] = []
    stop = asyncio.Event()
    watch = Watch(port)
    err = (tmp / "daemon.log").open("wb")
    started = time.monotonic()
    daemon = spawn(policy, err)
    out: dict[str, Any] = {"targets": len(fleet)}
    try:
        rss_start = None
        while True:  # every target swept once
            if daemon.poll() is not None:
                raise RuntimeError(f"pg-watchdog exited {daemon.returncode}: see {err.name}")
            with contextlib.suppress(OSError):
                watch.poll()
                rss_start = rss_start or rss_mb(daemon.pid)
                if len(watch.sweeps) == len(names) and min(watch.sweeps.values()) >= 1:
                    break
            await asyncio.sleep(0.25)
        out["all_swept_s"] = round(time.monotonic() - started, 2)
        cpu0, sweeps0 = cpu_s(daemon.pid), watch.total()
        streams = asyncio.create_task(victims(by_name, chosen, healthy, stop, opened, conns))

        async def phase(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await asyncio.sleep(SCRAPE_EVERY)
                await asyncio.to_thread(watch.poll)

        await phase(a.phase)
        rss_warm = rss_mb(daemon.pid)
        fault_at = time.time()
        healthy -= set(sick)
        for name in paused:
            by_name[name].pause()
        await asyncio.gather(*(asyncio.to_thread(by_name[n].stop, "immediate") for n in stopped))
        await phase(a.phase)
        stop.set()
        await streams
        await phase(THRESHOLD + 2)  # the last victims' kills
        for c in conns:
            c.terminate()
        end = time.time()
        cpu, sweeps = cpu_s(daemon.pid) - cpu0, watch.total() - sweeps0
        rss_end = rss_mb(daemon.pid)
        wall = time.monotonic() - started
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
        err.close()
    if a.keep_log:
        a.keep_log.write_bytes((tmp / "daemon.log").read_bytes())
    records = [json.loads(x) for x in audit.read_text().splitlines() if x.strip()]
    before, after, worst = lateness(records, healthy, fault_at)
    killed = {(r["target"], r["pid"]) for r in records if r["outcome"] == "terminated"}
    lost = [v for v in opened if v[0] in healthy and v not in killed]
    gaps, longest = missed(watch.seen, healthy, a.interval, end)
    per_sweep = cpu / sweeps * 1000 if sweeps else float("nan")
    out |= {
        "cpu_ms_per_target_sweep": round(per_sweep, 3),
        "cpu_share_500_at_30s": round(per_sweep / 1000 * 500 / 30, 4),
        "rss_mb": {"start": round(rss_start or 0, 1), "warm": round(rss_warm, 1),
                   "end": round(rss_end, 1)},
        "lateness_s": {"before": summary(before), "after": summary(after)},
        "missed_sweeps_healthy": gaps,
        "longest_gap_healthy_s": round(longest, 1),
        "sweeps_measured": int(sweeps),
        "cpu_s_measured": round(cpu, 2),
        "observed_cpu_share": round(cpu / (wall - out["all_swept_s"]), 4),
        "worst_kills": worst,
        "victims": len(opened),
        "victims_not_killed_healthy": len(lost),
        "paused": len(paused),
        "stopped": len(stopped),
        "exit_code": code,
        "interval_s": a.interval,
        "phase_s": a.phase,
        "load_avg": [round(x, 1) for x in os.getloadavg()],
        "load_max": round(max(x for _, x in watch.load), 1),
        "fault_at": round(fault_at, 1),
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--targets", type=int, default=100)
    p.add_argument("--interval", type=float, default=30.0)
    p.add_argument("--phase", type=float, default=None,
                   help="seconds before and after the faults (default 1.2 s per target, 20-120)")
    p.add_argument("--major", type=int, default=15)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep-log", type=Path, help="copy the daemon's log here")
    a = p.parse_args()
    if a.phase is None:
        a.phase = min(max(1.2 * a.targets, 20.0), 120.0)
    raise_nofile(4096)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pgwd-fleet-") as t:
        tmp = Path(t)
        tmp.chmod(0o711)
        fleet = start_fleet(a.major, a.targets, tmp)
        setup_s = time.monotonic() - t0
        try:
            about = machine(fleet[0])
            out = asyncio.run(measure(a, fleet, tmp))
        finally:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(TempCluster.cleanup, fleet))
    out["clusters_start_s"] = round(setup_s, 1)
    if a.json:
        print(json.dumps(out))
        return
    lb, la = out["lateness_s"]["before"], out["lateness_s"]["after"]
    print(about)
    print(f"{a.targets} clusters started in {setup_s:.0f} s; `pg-watchdog run` at interval "
          f"{a.interval:g} s, threshold {THRESHOLD:g} s; phases of {a.phase:g} s; "
          f"{out['paused']} SIGSTOPped + {out['stopped']} stopped after the first; "
          f"load avg now {out['load_avg']}, at most {out['load_max']} during the run")
    rows = [
        ["CPU per target-sweep", f"{out['cpu_ms_per_target_sweep']:.2f} ms",
         f"{out['sweeps_measured']} sweeps, {out['cpu_s_measured']} s CPU"],
        ["projected: 500 targets at 30 s", f"{out['cpu_share_500_at_30s'] * 100:.2f} % of a core",
         "< 5 %"],
        ["observed share of a core", f"{out['observed_cpu_share'] * 100:.2f} %",
         "sweeps every ~threshold, not every interval"],
        ["RSS start / warm / end", "{start} / {warm} / {end} MB".format(**out["rss_mb"]),
         "< 80 MB at 100, flat"],
        ["every target swept once", f"{out['all_swept_s']} s", "from process start"],
        ["lateness before faults", f"p50 {lb['p50']} p99 {lb['p99']} max {lb['max']} s",
         f"{lb['n']} kills; p99 < 0.5 s"],
        ["lateness after faults", f"p50 {la['p50']} p99 {la['p99']} max {la['max']} s",
         f"{la['n']} kills; p99 < 0.5 s"],
        ["sweeps missed, healthy", str(out["missed_sweeps_healthy"]),
         f"longest gap {out['longest_gap_healthy_s']} s"],
        ["victims not killed, healthy", str(out["victims_not_killed_healthy"]),
         f"of {out['victims']}"],
    ]
    print(table(["figure", "value", "note"], rows))
    print("latest kills (due, seconds after the faults; lateness s):",
          ", ".join(f"{d:+.1f}: {x:.3f}" for d, x in out["worst_kills"]))


if __name__ == "__main__":
    main()
