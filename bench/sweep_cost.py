"""Sweep cost: what one dry-run sweep with nothing due costs, against the bare
``SELECT * FROM pg_stat_activity`` over asyncpg, at 100, 1,000 and 5,000 sessions.

Each size gets its own throwaway server (max_connections = sessions + 20, small
shared_buffers); a child process holds the idle sessions. On one monitoring connection
(the watchdog's own settings) the four measurements take turns, median of --runs each:

  bare      conn.fetch("SELECT * FROM pg_stat_activity")
  snapshot  watchdog.snapshot.take_snapshot (the one SNAPSHOT query, rows -> Sessions)
  +decide   take_snapshot + watchdog.decide.decide with the default policies
  sweep     watchdog.sweep.sweep_target, dry run, nothing due (= `once --dry-run`)

With --profile, a cProfile of the sweeps of the largest size is printed too.

    .venv/bin/python bench/sweep_cost.py [--major 18] [--sizes 100,1000,5000] [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (
    SEED_POLICY,
    Holder,
    machine,
    median,
    raise_nofile,
    samples_ms,
    setup_roles,
    table,
)

from watchdog import queries
from watchdog.audit import AuditLog
from watchdog.config import load_config
from watchdog.connect import connect, server_address
from watchdog.decide import decide
from watchdog.snapshot import sessions_from_rows, take_snapshot
from watchdog.sweep import sweep_target
from watchdog.tempcluster import start_cluster


async def measure(
    dsn_postgres: str, dsn: str, tmp: Path, runs: int, profile: bool
) -> dict[str, Any]:
    path = tmp / "policies.yaml"
    path.write_text(SEED_POLICY.format(dsn=dsn, poolers="", audit=tmp / "audit.jsonl"))
    config = load_config(str(path))
    target = config.targets[0]
    audit = AuditLog(config.audit.path)
    conn = await connect(target)
    server = await server_address(conn)

    async def bare() -> Any:
        return await conn.fetch("SELECT * FROM pg_stat_activity")

    async def snapshot() -> Any:
        return await take_snapshot(conn)

    async def snap_decide() -> Any:
        return decide(await take_snapshot(conn), config, target.name, dry_run=True)

    async def sweep() -> Any:
        report = await sweep_target(conn, server, config, target, audit, dry_run=True)
        assert not report.decision.actions
        return report

    try:
        for fn in (bare, snapshot, snap_decide, sweep):  # warm up plans and caches
            for _ in range(3):
                await fn()
        results: dict[str, list[float]] = {n: [] for n in ("bare", "snapshot", "decide", "sweep")}
        rounds = 5  # interleave, so drift on the machine hits every measurement alike
        for _ in range(rounds):
            results["bare"] += await samples_ms(bare, runs // rounds)
            results["snapshot"] += await samples_ms(snapshot, runs // rounds)
            results["decide"] += await samples_ms(snap_decide, runs // rounds)
            results["sweep"] += await samples_ms(sweep, runs // rounds)
        rows = len(await bare())
        # Where the time goes, outside the server: decoding vs building Sessions vs deciding.
        raw = await conn.fetch(queries.SNAPSHOT, [])
        t = time.perf_counter()
        snap = await take_snapshot(conn)
        t_snap = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(5):
            decide(snap, config, target.name, dry_run=True)
        t_decide = (time.perf_counter() - t) / 5
        t = time.perf_counter()
        for _ in range(5):
            sessions_from_rows(raw)
        t_sessions = (time.perf_counter() - t) / 5
        prof = None
        if profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(10):
                await sweep()
            pr.disable()
            out = io.StringIO()
            pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
            prof = out.getvalue()
        return {
            "rows": rows,
            **{k: median(v) for k, v in results.items()},
            **{f"{k}_min": min(v) for k, v in results.items()},
            "snap_once": t_snap * 1000,
            "decide_only": t_decide * 1000,
            "sessions_only": t_sessions * 1000,
            "profile": prof,
        }
    finally:
        await conn.close()


def run_size(major: int, n: int, runs: int, profile: bool) -> tuple[dict[str, Any], str]:
    settings = {"shared_buffers": "16MB", "max_locks_per_transaction": "16"}
    with tempfile.TemporaryDirectory(prefix="pgwd-bench-") as tmp:
        Path(tmp).chmod(0o711)
        pg = start_cluster(major, max_connections=n + 20, settings=settings, base_dir=Path(tmp))
        try:
            setup_roles(pg)
            t = time.monotonic()
            with Holder(pg.dsn("app"), n, "bench-idle"):
                opened = time.monotonic() - t
                print(f"  {n} sessions open in {opened:.1f}s", flush=True)
                result = asyncio.run(
                    measure(pg.dsn(), pg.dsn("watchdog"), Path(tmp), runs, profile)
                )
            return result, machine(pg)
        finally:
            pg.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--sizes", default="100,1000,5000")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    raise_nofile(max(sizes) + 1024)
    rows = []
    about = profile_text = ""
    for n in sizes:
        print(f"size {n}: starting PostgreSQL {a.major} with max_connections={n + 20}", flush=True)
        r, about = run_size(a.major, n, a.runs, a.profile and n == max(sizes))
        rows.append(
            [
                n,
                r["rows"],
                f"{r['bare']:.2f}",
                f"{r['snapshot']:.2f}",
                f"{r['decide']:.2f}",
                f"{r['sweep']:.2f}",
                f"{r['sweep'] / r['bare']:.2f}x",
                f"{r['sweep_min'] / r['bare_min']:.2f}x",
                f"{r['sessions_only']:.2f}",
                f"{r['decide_only']:.2f}",
            ]
        )
        if r["profile"]:
            profile_text = r["profile"]
    print()
    print(about)
    print(
        f"median of {a.runs} runs each (ms), interleaved; sweep/bare also from the minimums "
        "(less sensitive to a busy machine); target: sweep / bare <= 1.5x"
    )
    print(
        table(
            [
                "sessions",
                "rows",
                "bare",
                "snapshot",
                "+decide",
                "sweep",
                "sweep/bare",
                "(of mins)",
                "rows->Session",
                "decide()",
            ],
            rows,
        )
    )
    if a.profile:
        print("\ncProfile of 10 dry-run sweeps at the largest size (by own time):")
        print(profile_text)


if __name__ == "__main__":
    main()
