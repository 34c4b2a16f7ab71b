"""Login cost: what the throwaway servers' SCRAM costs a test connection (asyncpg connect + close).

One throwaway PostgreSQL and a PgBouncer in front of it; interleaved rounds, --runs logins
each, one after another, as the tests open them:

  trust            pg_hba trust for one role (what every login was before the passwords)
  scram            SCRAM with the cluster's password (its verifier: 4096 iterations)
  pgbouncer-trust  PgBouncer with auth_type trust (logging in to PostgreSQL with SCRAM)
  pgbouncer-scram  SCRAM to PgBouncer, which passes the client's key on to PostgreSQL

    .venv/bin/python bench/login_cost.py [--major 17] [--runs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg
from benchlib import machine, median, pct, table
from temppooler import start_pooler

from watchdog.commands.demo.tempcluster import start_cluster


async def login_ms(dsn: str, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        conn = await asyncpg.connect(dsn, timeout=30)
        await conn.close()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--major", type=int, default=17)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pg = start_cluster(args.major)
    poolers = []
    try:
        pg.psql("CREATE ROLE app LOGIN; CREATE ROLE app_trust LOGIN")
        hba = pg.datadir / "pg_hba.conf"
        hba.write_text("host all app_trust 127.0.0.1/32 trust\n" + hba.read_text())
        pg.psql("SELECT pg_reload_conf()")
        poolers = [start_pooler(pg, settings={"auth_type": "trust"}), start_pooler(pg)]
        dsns = {"trust": pg.dsn("app_trust"), "scram": pg.dsn("app"),
                "pgbouncer-trust": poolers[0].dsn("app", "postgres"),
                "pgbouncer-scram": poolers[1].dsn("app", "postgres")}
        print(machine(pg))
        samples: dict[str, list[float]] = {name: [] for name in dsns}
        for _ in range(args.rounds):
            for name, dsn in dsns.items():
                samples[name] += asyncio.run(login_ms(dsn, args.runs))
        rows = []
        for name, s in samples.items():
            base = median(samples["pgbouncer-trust" if "pgbouncer" in name else "trust"])
            rows.append((name, f"{median(s):.2f}", f"{pct(s, 90):.2f}",
                         f"{median(s) - base:+.2f}"))
        print(table(["login", "median ms", "p90 ms", "vs trust: s per 1000 logins"], rows))
    finally:
        for pooler in poolers:
            pooler.cleanup()
        pg.cleanup()


if __name__ == "__main__":
    main()
