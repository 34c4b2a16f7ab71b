"""Service timing figures the tests only check as behaviour: systemd watchdog ping gaps,
failover after the leader is SIGKILLed, and shutdown with a hung server.

The real ``pg-watchdog run`` processes, a real datagram socket standing in for systemd.
Ping gaps at WATCHDOG_USEC=1 s (pings every 0.5 s); failover: two instances (interval
1 s, idle sessions of role app past 1 s), the leader SIGKILLed, a victim opened at once;
seconds from the kill to the victim's termination (the threshold is 1 s of it). Shutdown:
SIGTERM to exit of a service holding five connections over a network silenced by iptables
(each close may wait 2 s for its goodbye to leave; they run concurrently). Needs root.

    .venv/bin/python bench/service_timing.py [--major 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from benchlib import machine, median, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemon import Daemon, write_config
from notify_listener import NotifyListener
from partition import LEADER_ADDR, LISTEN, Partition, allow_loopback, dsn_via
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster, start_cluster


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s")
        await asyncio.sleep(0.02)


async def ping_gaps(pg: TempCluster, tmp: Path, n: int = 20) -> list[float]:
    cfg = write_config(tmp / "ping.yaml", pg, idle="1h")
    with NotifyListener() as listener, Daemon(cfg, listener.environ(WATCHDOG_USEC="1000000")):
        await listener.expect("READY", timeout=30)
        stamps = []
        for _ in range(n + 1):
            await listener.expect("WATCHDOG", timeout=10)
            stamps.append(time.monotonic())
    return [b - a for a, b in itertools.pairwise(stamps)]


async def sigkill_failover(pg: TempCluster, tmp: Path, n: int) -> float:
    cfg_a = write_config(tmp / f"a{n}.yaml", pg, audit=tmp / f"a{n}.jsonl")
    cfg_b = write_config(tmp / f"b{n}.yaml", pg, audit=tmp / f"b{n}.jsonl")
    admin = await asyncpg.connect(pg.dsn(), timeout=10)
    try:
        with Daemon(cfg_a) as a:

            async def leads() -> bool:
                return "this instance acts" in a.log()

            await _until(leads)
            with Daemon(cfg_b) as b:

                async def observes() -> bool:
                    return "observing" in b.log()

                await _until(observes)
                a.kill()
                killed = time.monotonic()
                victim = await asyncpg.connect(pg.dsn("app"), timeout=10)
                pid = await victim.fetchval("SELECT pg_backend_pid()")

                async def gone() -> bool:
                    return not await admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
                    )

                await _until(gone)
                took = time.monotonic() - killed
                victim.terminate()
                b.stop()
    finally:
        await admin.close()
    return took


async def hung_shutdown(pg: TempCluster, tmp: Path, targets: int = 5) -> float:
    """Seconds from SIGTERM to exit, ``targets`` held connections over a silenced network."""
    dsn = dsn_via(pg, LEADER_ADDR)
    cfg = write_config(tmp / "hung.yaml", pg, idle="1h", interval="30s", dsn=dsn)
    text = cfg.read_text()
    head, _, rest = text.partition("exclude:")
    block = head.split("targets:\n", 1)[1]
    cfg.write_text(
        "targets:\n"
        + "".join(block.replace("name: main", f"name: t{i}") for i in range(targets))
        + "exclude:"
        + rest
    )
    with Daemon(cfg) as d:

        async def connected() -> bool:
            return d.log().count("connected to") >= targets

        await _until(connected)
        await asyncio.sleep(1)  # the first sweeps are over; none is due for 30 s
        with Partition(LEADER_ADDR) as part:
            part.cut()
            started = time.monotonic()
            d.stop()
            took = time.monotonic() - started
    return took


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--major", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pg = start_cluster(args.major, settings=LISTEN)
    try:
        allow_loopback(pg)
        setup_roles(pg)
        with tempfile.TemporaryDirectory() as tmp:
            gaps = await ping_gaps(pg, Path(tmp))
            failovers = [await sigkill_failover(pg, Path(tmp), n) for n in range(args.rounds)]
            shutdown = await hung_shutdown(pg, Path(tmp))
        print(machine(pg))
        print(
            table(
                ["figure", "median", "min", "max"],
                [
                    (
                        "ping gap (s), period 0.5 s",
                        f"{median(gaps):.3f}",
                        f"{min(gaps):.3f}",
                        f"{max(gaps):.3f}",
                    ),
                    (
                        "SIGKILL failover (s), threshold 1 s",
                        f"{median(failovers):.2f}",
                        f"{min(failovers):.2f}",
                        f"{max(failovers):.2f}",
                    ),
                    ("SIGTERM to exit (s), 5 targets, network silent", f"{shutdown:.2f}", "", ""),
                ],
            )
        )
    finally:
        pg.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
