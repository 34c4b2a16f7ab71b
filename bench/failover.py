"""Failover under a silent network: how long until the follower acts?

Two real ``pg-watchdog run`` processes watch one server (interval 1 s, idle sessions of
role app past 1 s): A through 127.0.0.2, B through 127.0.0.3. Once A leads, iptables DROP
rules silence 127.0.0.2 both ways and a victim goes idle at once (via 127.0.0.1). Measured
from the cut: when the server drops A's backend (its keepalives / tcp_user_timeout give
up, releasing the lock), and when B's kill of the victim lands. The victim is due 1 s
after the cut, so the kill time is the failover time for a session already due.

    .venv/bin/python bench/failover.py [--major 15] [--rounds 3]

Needs root (iptables). The rules are removed in a finally.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from benchlib import machine, median, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import Daemon, write_config
from partition import (
    FOLLOWER_ADDR,
    LEADER_ADDR,
    LISTEN,
    Partition,
    allow_loopback,
    dsn_via,
)
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster, start_cluster
from watchdog.config.policy import LEADER_KEY
from watchdog.pg import queries


async def _until(check: Callable[[], Awaitable[bool]], since: float, timeout: float) -> float:
    """Seconds from ``since`` until ``check()`` is true (polled every 50 ms)."""
    while not await check():
        if time.monotonic() - since > timeout:
            raise TimeoutError(f"not within {timeout:g}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - since


async def _round(pg: TempCluster, tmp: Path, n: int) -> tuple[float, float]:
    cfg_a = write_config(
        tmp / f"a{n}.yaml", pg, audit=tmp / f"a{n}.jsonl", dsn=dsn_via(pg, LEADER_ADDR)
    )
    cfg_b = write_config(
        tmp / f"b{n}.yaml", pg, audit=tmp / f"b{n}.jsonl", dsn=dsn_via(pg, FOLLOWER_ADDR)
    )
    admin = await asyncpg.connect(pg.dsn(), timeout=10)
    with Daemon(cfg_a) as a, Partition(LEADER_ADDR) as part:

        async def leads() -> bool:
            return "this instance acts" in a.log()

        await _until(leads, time.monotonic(), 60)
        with Daemon(cfg_b) as b:

            async def observes() -> bool:
                return "observing" in b.log()

            await _until(observes, time.monotonic(), 60)
            # A's backend: the lock holder (every instance's client address is 127.0.0.1;
            # only the server address differs).
            leader_pid = await admin.fetchval(queries.LOCK_HOLDER, LEADER_KEY)
            part.cut()
            cut = time.monotonic()
            victim = await asyncpg.connect(pg.dsn("app"), timeout=10)
            pid = await victim.fetchval("SELECT pg_backend_pid()")

            async def a_gone() -> bool:
                return not await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", leader_pid
                )

            async def killed() -> bool:
                return not await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
                )

            dropped = await _until(a_gone, cut, 120)
            kill = await _until(killed, cut, 120)
            part.heal()
            victim.terminate()
            b.stop()
            a.stop()
    await admin.close()
    return dropped, kill


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--major", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pg = start_cluster(args.major, settings=LISTEN)
    try:
        allow_loopback(pg)
        setup_roles(pg)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(args.rounds):
                dropped, kill = await _round(pg, Path(tmp), n)
                rows.append((n + 1, f"{dropped:.1f}", f"{kill:.1f}"))
        print(machine(pg))
        print(table(["round", "A's backend dropped (s)", "victim killed by B (s)"], rows))
        kills = [float(r[2]) for r in rows]
        print(
            f"failover (cut -> kill of a session due 1 s after the cut): median "
            f"{median(kills):.1f}s, max {max(kills):.1f}s"
        )
    finally:
        pg.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
