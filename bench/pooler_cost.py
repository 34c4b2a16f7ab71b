"""Pooler cost: what reading one PgBouncer adds to a sweep, with N backends held behind it.

One throwaway PostgreSQL and one PgBouncer (session pooling, pool size N) in front of it; a
child process holds N idle clients through PgBouncer, so PostgreSQL has N backends and
PgBouncer N clients plus N server connections (2N rows of SHOW SOCKETS). On the watchdog's
own connections, interleaved, median of --runs each:

  sweep          watchdog.service.sweep.sweep_target, dry run, nothing due, no pooler configured
  sweep+pooler   the same target with the pooler (nothing near a threshold: no candidate, so
                 SHOW SOCKETS is not read; SHOW POOLS and LISTS once per interval)
  read           one SHOW SOCKETS round trip, rows checked (watchdog.pgbouncer.console.read_sockets)
  attribute      matching the read's server sockets to the snapshot's backends

    .venv/bin/python bench/pooler_cost.py [--major 18] [--size 1000] [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
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
from temppooler import start_pooler

from watchdog.audit.log import AuditLog
from watchdog.commands.demo.tempcluster import start_cluster
from watchdog.config.policy import load_config
from watchdog.pg.connect import connect, server_address
from watchdog.pg.snapshot import take_snapshot
from watchdog.pgbouncer.console import attribute, connect_pooler, max_client_conn, read_sockets
from watchdog.pgbouncer.watch import PoolerWatch
from watchdog.service.sweep import sweep_target


async def measure(dsn: str, pooler_dsn: str, tmp: Path, runs: int) -> dict[str, Any]:
    plain, pooled = tmp / "plain.yaml", tmp / "pooled.yaml"
    audit = tmp / "audit.jsonl"
    plain.write_text(SEED_POLICY.format(dsn=dsn, poolers="", audit=audit))
    pooled.write_text(SEED_POLICY.format(
        dsn=dsn, audit=audit,
        poolers=f"    poolers: [{{name: pgb1, dsn: '{pooler_dsn}'}}]"))
    config, config_p = load_config(str(plain)), load_config(str(pooled))
    target, target_p = config.targets[0], config_p.targets[0]
    log = AuditLog(config.audit.path)
    conn = await connect(target)
    server = await server_address(conn)
    watch = PoolerWatch(target_p)

    async def sweep() -> Any:
        report = await sweep_target(conn, server, config, target, log, dry_run=True)
        assert not report.decision.actions
        return report

    async def sweep_pooled() -> Any:
        report = await sweep_target(conn, server, config_p, target_p, log, dry_run=True,
                                    poolers=watch)
        assert not report.decision.actions and not report.poolers.errors
        return report

    console = await connect_pooler(target_p.poolers[0])
    limit = await max_client_conn(console)

    async def read() -> Any:
        # The read itself: PoolerWatch reuses an answer for a second, so go below it.
        return await read_sockets(console, limit)

    try:
        for fn in (sweep, sweep_pooled, read):
            for _ in range(3):
                await fn()
        snapshot = await take_snapshot(conn)
        looks = (await watch.read()).looks

        async def match() -> Any:
            return attribute(looks, snapshot.sessions, server)

        names = ("sweep", "sweep+pooler", "read", "attribute")
        fns = (sweep, sweep_pooled, read, match)
        results: dict[str, list[float]] = {n: [] for n in names}
        rounds = 5  # interleaved, so drift on the machine hits every measurement alike
        for _ in range(rounds):
            for name, fn in zip(names, fns, strict=True):
                results[name] += await samples_ms(fn, runs // rounds)
        report = await sweep_pooled()
        return {
            "backends": snapshot.used,
            "sockets": len(looks[0].sockets),
            "attributed": len(report.snapshot.pooled),
            **{k: median(v) for k, v in results.items()},
            **{f"{k}_min": min(v) for k, v in results.items()},
        }
    finally:
        await console.close()
        await watch.close()
        await conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--runs", type=int, default=30)
    a = p.parse_args()
    n = a.size
    raise_nofile(3 * n + 1024)  # PgBouncer inherits it: two sockets per held client
    settings = {"shared_buffers": "16MB", "max_locks_per_transaction": "16"}
    with tempfile.TemporaryDirectory(prefix="pgwd-bench-") as tmp:
        Path(tmp).chmod(0o711)
        pg = start_cluster(a.major, max_connections=n + 20, settings=settings,
                           base_dir=Path(tmp))
        try:
            setup_roles(pg)
            pooler = start_pooler(pg, pool_mode="session", base_dir=Path(tmp), settings={
                "default_pool_size": str(n + 10), "max_client_conn": str(n + 100),
                "max_db_connections": "0"})
            try:
                t = time.monotonic()
                with Holder(pooler.dsn("app", "postgres"), n, "bench-idle"):
                    print(f"{n} clients open through PgBouncer in {time.monotonic() - t:.1f}s",
                          flush=True)
                    r = asyncio.run(measure(pg.dsn("watchdog"), pooler.dsn(), Path(tmp), a.runs))
                about = machine(pg)
            finally:
                pooler.cleanup()
        finally:
            pg.cleanup()
    print()
    print(about)
    print(f"{r['backends']} client backends, {r['sockets']} PgBouncer sockets,"
          f" {r['attributed']} backends attributed to the pooler")
    print(f"median (min) of {a.runs} runs each, ms, interleaved")
    print(table(
        ["measurement", "median", "min"],
        [[k, f"{r[k]:.2f}", f"{r[k + '_min']:.2f}"]
         for k in ("sweep", "sweep+pooler", "read", "attribute")],
    ))
    extra = r["sweep+pooler"] - r["sweep"]
    print(f"the pooler adds {extra:.2f} ms to a sweep ({r['sweep+pooler'] / r['sweep']:.2f}x);"
          f" its read alone is {r['read']:.2f} ms, run only for candidates from its address")


if __name__ == "__main__":
    main()
