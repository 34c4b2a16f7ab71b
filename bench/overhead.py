"""Overhead: what the watchdog costs the database it guards, measured with pgbench side by side.

One throwaway PostgreSQL with a pgbench database, N extra sessions held by a child process
(idle, role ``idler``) and a smaller set of leaky sessions (role ``app``) that go idle at
staggered moments
(one every --crossing seconds) so that, for the fast cadence, a session crosses its threshold
all the time. Three ways, alternating within every round (the order rotates between rounds):

  without   no watchdog
  default   ``pg-watchdog run``, seed policies, interval 30 s, nothing due: the steady state
  fast      ``pg-watchdog run`` in dry run with a policy on role ``app`` whose threshold makes
            one of them cross every --crossing seconds: sweeps at the 250 ms floor

Each way runs pgbench (select-only ``-S`` and the default TPC-B-like script, --clients
clients, --seconds seconds) and reports TPS and per-transaction latency p50/p99 (from pgbench's
transaction log), and the watchdog's sweeps per second (from its own metrics). With
--pgbouncer the same runs go through a real PgBouncer (transaction pooling): pgbench connects
through it, the leaky sessions hold it idle in transaction (their backends come from the
pooler's address) and the watchdog reads the pooler (``poolers:``).

Ratios are against ``without`` of the same round, then summarised over the rounds (median and
the spread min..max), so the machine's own noise shows.

    .venv/bin/python bench/overhead.py [--major 18] [--sessions 1000,5000] [--rounds 5]
        [--seconds 20] [--clients 8] [--pgbouncer] [--scripts select-only,tpcb]
        [--watchdog-tree DIR] [--json]

``--watchdog-tree DIR`` runs the watchdog from another checkout (e.g. an older commit in a
git worktree), so before and after are measured by the same bench on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchlib import REPO, Holder, machine, median, pct, raise_nofile, table
from temppooler import TempPooler, start_pooler

from watchdog.commands.demo.tempcluster import TempCluster, free_port, start_cluster

MODES = ("without", "default", "fast")
SCRIPTS = {"select-only": ["-S"], "tpcb": []}
SCALE = 10
WARMUP = 4.0  # the fast policy's first crossing, seconds after the watchdog starts

DEFAULT_POLICY = """
targets:
  - name: bench
    dsn: {dsn}
    interval: 30s
{poolers}
exclude:
  superusers: true
  applications: ["pg_dump*", "pg_basebackup", "psql"]
  listeners: true
policies:
  - name: idle
    state: idle
    longer_than: 1d
  - name: idle-in-transaction
    state: [idle in transaction, idle in transaction (aborted)]
    longer_than: 1d
audit:
  path: {audit}
metrics:
  listen: 127.0.0.1:{port}
"""

FAST_POLICY = """
dry_run: true
targets:
  - name: bench
    dsn: {dsn}
    interval: 30s
{poolers}
exclude:
  superusers: true
  applications: ["pg_dump*", "pg_basebackup", "psql"]
  listeners: true
policies:
  - name: leak
    state: [idle, idle in transaction]
    users: [app]
    longer_than: {threshold}ms
audit:
  path: {audit}
metrics:
  listen: 127.0.0.1:{port}
"""


def setup(pg: TempCluster) -> None:
    grants = "pg_monitor, pg_signal_backend"
    if pg.major >= 16:
        grants += ", pg_use_reserved_connections"
    pg.psql(
        f"CREATE ROLE app LOGIN; CREATE ROLE idler LOGIN; CREATE ROLE watchdog LOGIN;"
        f" GRANT {grants} TO watchdog;"
    )
    res = subprocess.run(
        [
            str(pg.bindir / "pgbench"),
            "-i",
            "-q",
            "-s",
            str(SCALE),
            "-h",
            pg.host,
            "-p",
            str(pg.port),
            "-U",
            "postgres",
            "postgres",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode:
        raise SystemExit(f"pgbench -i failed: {res.stderr.strip()}")


class Watchdog:
    """A ``pg-watchdog run`` child process, from this checkout or --watchdog-tree."""

    def __init__(self, policy: Path, port: int, tree: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.port = port
        self.log = policy.with_suffix(".log")
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "watchdog", "run", "-c", str(policy)],
                cwd=tree,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def sweeps(self) -> float:
        """pg_watchdog_sweeps_total summed over its labels (NaN until it serves metrics)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return float("nan")
        found = re.findall(r"^pg_watchdog_sweeps_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
        return sum(float(v) for v in found) if found else float("nan")

    def wait_swept(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"pg-watchdog exited: {self.log.read_text()[-2000:]}")
            if self.sweeps() >= 1:
                return
            time.sleep(0.1)
        raise SystemExit(f"pg-watchdog never swept: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pgbench(
    pg: TempCluster, host: str, port: int, script: str, clients: int, seconds: float, logdir: Path
) -> dict[str, float]:
    """One pgbench run: TPS and latency percentiles (ms) from its transaction log."""
    for old in logdir.glob("tx*"):
        old.unlink()
    cmd = [
        str(pg.bindir / "pgbench"),
        "-n",
        *SCRIPTS[script],
        "-c",
        str(clients),
        "-j",
        str(min(clients, 2)),
        "-T",
        str(int(seconds)),
        "-h",
        host,
        "-p",
        str(port),
        "-U",
        "postgres",
        "-l",
        "--sampling-rate",
        "0.25",
        f"--log-prefix={logdir}/tx",
        "postgres",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=logdir, check=False)
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", res.stdout)
    if res.returncode or m is None:
        raise SystemExit(f"pgbench failed: {res.stderr.strip() or res.stdout.strip()}")
    latencies = []
    for f in logdir.glob("tx*"):
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                latencies.append(int(parts[2]) / 1000)
    return {"tps": float(m.group(1)), "p50": pct(latencies, 50), "p99": pct(latencies, 99)}


@contextlib.contextmanager
def watchdog_for(
    mode: str,
    pg: TempCluster,
    pooler: TempPooler | None,
    tmp: Path,
    tree: Path,
    leaky_idle_from: float,
) -> Iterator[Watchdog | None]:
    if mode == "without":
        yield None
        return
    port = free_port()
    poolers = f"    poolers: [{{name: pgb1, dsn: '{pooler.dsn()}'}}]" if pooler else ""
    fields = {
        "dsn": pg.dsn("watchdog"),
        "poolers": poolers,
        "audit": tmp / f"{mode}.jsonl",
        "port": port,
    }
    threshold = 0.0
    if mode == "fast":
        # The first leaky session went idle at leaky_idle_from; with this threshold it crosses
        # once pgbench starts, and the next one every --crossing seconds after it.
        threshold = time.time() + WARMUP - leaky_idle_from
        text = FAST_POLICY.format(threshold=int(threshold * 1000), **fields)
    else:
        text = DEFAULT_POLICY.format(**fields)
    policy = tmp / f"{mode}.yaml"
    policy.write_text(text)
    wd = Watchdog(policy, port, tree)
    try:
        wd.wait_swept()
        if mode == "fast":  # pgbench starts with the first crossing, not before it
            time.sleep(max(0.0, leaky_idle_from + threshold - time.time()))
        yield wd
    finally:
        wd.stop()


def run_size(a: argparse.Namespace, n: int, tree: Path) -> tuple[dict[str, Any], str]:
    leaky = a.leaky
    # Every leaky session must still be ahead of its crossing at the end of the longest
    # fast round: spread over more than one round's length.
    spread = leaky * a.crossing
    per_round = (a.seconds + WARMUP + 2) * len(a.scripts)
    if spread < per_round:
        raise SystemExit(f"--leaky {leaky} x --crossing {a.crossing} must cover {per_round:.0f}s")
    settings = {"shared_buffers": "64MB", "max_locks_per_transaction": "32"}
    with tempfile.TemporaryDirectory(prefix="pgwd-overhead-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)
        pg = start_cluster(
            a.major, max_connections=n + leaky + a.clients + 60, settings=settings, base_dir=tmp
        )
        pooler = None
        try:
            setup(pg)
            about = machine(pg)
            if a.pgbouncer:
                pool = str(leaky + a.clients + 10)
                pooler = start_pooler(
                    pg,
                    settings={
                        "default_pool_size": pool,
                        "max_client_conn": str(leaky + a.clients + 50),
                        "max_db_connections": "0",
                    },
                    base_dir=tmp,
                )
            bench_host, bench_port = (
                (pg.host, pg.port) if pooler is None else ("127.0.0.1", pooler.port)
            )
            leaky_dsn = (
                pg.dsn("app")
                if pooler is None
                else f"postgresql://app@127.0.0.1:{pooler.port}/postgres"
            )
            print(f"  holding {n} idle sessions and {leaky} leaky ones", flush=True)
            with (
                Holder(pg.dsn("idler"), n, "bench-idle"),
                Holder(
                    leaky_dsn,
                    leaky,
                    "bench-leaky",
                    "stagger" if pooler is None else "stagger_iit",
                    spread,
                ),
            ):
                leaky_idle_from = time.time()
                rows: list[dict[str, Any]] = []
                logdir = tmp / "pgbench"
                logdir.mkdir()
                logdir.chmod(0o777)
                for r in range(a.rounds):
                    order = MODES[r % 3 :] + MODES[: r % 3]
                    for mode in order:
                        with watchdog_for(mode, pg, pooler, tmp, tree, leaky_idle_from) as wd:
                            before = wd.sweeps() if wd else 0.0
                            t = time.monotonic()
                            for script in a.scripts:
                                res = pgbench(
                                    pg, bench_host, bench_port, script, a.clients, a.seconds, logdir
                                )
                                rows.append({"round": r, "mode": mode, "script": script, **res})
                            took = time.monotonic() - t
                            rate = ((wd.sweeps() - before) / took) if wd else 0.0
                            for row in rows[-len(a.scripts) :]:
                                row["sweeps_per_s"] = rate
                        print(
                            f"  round {r + 1}/{a.rounds} {mode:8s} "
                            + "  ".join(
                                f"{x['script']} {x['tps']:.0f} tps p99 {x['p99']:.2f}ms"
                                for x in rows[-len(a.scripts) :]
                            )
                            + (f"  ({rate:.2f} sweeps/s)" if mode != "without" else ""),
                            flush=True,
                        )
            return {"sessions": n, "rows": rows}, about
        finally:
            if pooler is not None:
                pooler.cleanup()
            pg.cleanup()


def summarise(result: dict[str, Any], scripts: list[str]) -> list[dict[str, Any]]:
    """Per script and mode: medians, and ratios against `without` of the same round."""
    rows = result["rows"]
    out = []
    for script in scripts:
        base = {r["round"]: r for r in rows if r["script"] == script and r["mode"] == "without"}
        for mode in MODES:
            mine = [r for r in rows if r["script"] == script and r["mode"] == mode]
            tps_ratio = [r["tps"] / base[r["round"]]["tps"] for r in mine]
            p99_ratio = [r["p99"] / base[r["round"]]["p99"] for r in mine]
            out.append(
                {
                    "sessions": result["sessions"],
                    "script": script,
                    "mode": mode,
                    "tps": median([r["tps"] for r in mine]),
                    "p50_ms": median([r["p50"] for r in mine]),
                    "p99_ms": median([r["p99"] for r in mine]),
                    "sweeps_per_s": median([r["sweeps_per_s"] for r in mine]),
                    "tps_ratio": median(tps_ratio),
                    "tps_ratio_min": min(tps_ratio),
                    "tps_ratio_max": max(tps_ratio),
                    "p99_ratio": median(p99_ratio),
                    "p99_ratio_min": min(p99_ratio),
                    "p99_ratio_max": max(p99_ratio),
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--sessions", default="1000,5000")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument(
        "--leaky",
        type=int,
        default=400,
        help="sessions crossing their threshold one after another (fast cadence)",
    )
    p.add_argument(
        "--crossing",
        type=float,
        default=0.2,
        help="seconds between two leaky sessions crossing (<= 0.25: floor cadence)",
    )
    p.add_argument("--scripts", default="select-only,tpcb")
    p.add_argument("--pgbouncer", action="store_true")
    p.add_argument("--watchdog-tree", type=Path, default=REPO)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    a.scripts = a.scripts.split(",")
    sizes = [int(s) for s in a.sessions.split(",")]
    raise_nofile(max(sizes) + a.leaky + 1024)
    tree = a.watchdog_tree.resolve()
    summary: list[dict[str, Any]] = []
    about = ""
    for n in sizes:
        print(
            f"size {n}: PostgreSQL {a.major}{' behind PgBouncer' if a.pgbouncer else ''}, "
            f"watchdog from {tree}",
            flush=True,
        )
        result, about = run_size(a, n, tree)
        summary += summarise(result, a.scripts)
    if a.json:
        print(
            json.dumps(
                {
                    "machine": about,
                    "pgbouncer": a.pgbouncer,
                    "rounds": a.rounds,
                    "seconds": a.seconds,
                    "clients": a.clients,
                    "summary": summary,
                },
                indent=2,
            )
        )
        return
    print()
    print(about)
    print(
        f"pgbench {a.clients} clients x {a.seconds:g}s, {a.rounds} rounds, modes alternating;"
        f" ratios against 'without' of the same round: median (min..max)"
    )
    print(
        table(
            [
                "sessions",
                "script",
                "mode",
                "sweeps/s",
                "tps",
                "p50 ms",
                "p99 ms",
                "tps ratio",
                "p99 ratio",
            ],
            [
                [
                    s["sessions"],
                    s["script"],
                    s["mode"],
                    f"{s['sweeps_per_s']:.2f}",
                    f"{s['tps']:.0f}",
                    f"{s['p50_ms']:.2f}",
                    f"{s['p99_ms']:.2f}",
                    f"{s['tps_ratio']:.3f} ({s['tps_ratio_min']:.3f}..{s['tps_ratio_max']:.3f})",
                    f"{s['p99_ratio']:.3f} ({s['p99_ratio_min']:.3f}..{s['p99_ratio_max']:.3f})",
                ]
                for s in summary
            ],
        )
    )


if __name__ == "__main__":
    main()
