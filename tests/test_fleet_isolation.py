"""One target's trouble never holds up another's sweeps: a real `pg-watchdog run` watching
several real servers, one SIGSTOPped (hung, sockets open), one stopped (refusing), one flooded
with victims; and name lookups that hang."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
from conftest import MakeCluster
from daemon import Daemon, audit_records, backend_alive
from helpers import connect, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.service.resolver import Resolver

NAMES = ("healthy", "flooded", "hung", "refusing")
FLOOD = 15


def metric(port: int, name: str) -> dict[str, float]:
    """``name``'s value per target from the daemon's /metrics (empty while it is not up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {s.labels["target"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def write_fleet(path: Path, clusters: dict[str, TempCluster], port: int) -> Path:
    # The hung target's sweep may hang for sweep_timeout(10 s) = 20 s: long enough to see
    # the others kill and sweep meanwhile, whatever the machine's load.
    targets = "\n".join(
        f"  - {{name: {n}, dsn: \"{c.dsn('watchdog')}\", interval: {10 if n == 'hung' else 1}s}}"
        for n, c in clusters.items()
    )
    path.write_text(f"""targets:
{targets}
exclude: {{superusers: true, applications: ["psql"]}}
policies:
  - {{name: idle, state: idle, longer_than: 1s, users: [app]}}
audit: {{path: "{path.parent / 'audit.jsonl'}"}}
metrics: {{listen: "127.0.0.1:{port}"}}
""")
    return path


async def test_a_hung_and_a_refusing_server_delay_no_kill_on_the_others(
    pg: TempCluster, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    clusters = dict(zip(NAMES, [pg, *(make_cluster(pg.major) for _ in NAMES[1:])], strict=True))
    for c in clusters.values():
        setup_roles(c)
    port = free_port()
    cfg = write_fleet(tmp_path / "fleet.yaml", clusters, port)
    audit = tmp_path / "audit.jsonl"
    victims: list[asyncpg.Connection] = []
    with Daemon(cfg) as daemon:
        try:
            def all_swept() -> bool:
                swept = metric(port, "pg_watchdog_sweeps_total")
                return len(swept) == len(NAMES) and min(swept.values()) >= 1

            await wait_for(all_swept, timeout=60, interval=0.2, what="a sweep of every target")
            clusters["hung"].pause()
            clusters["refusing"].stop("immediate")
            before = metric(port, "pg_watchdog_sweeps_total")

            pids: dict[int, str] = {}
            for name, n in (("healthy", 1), ("flooded", FLOOD)):
                for _ in range(n):
                    conn = await connect(clusters[name], "app", application_name="leaky")
                    victims.append(conn)
                    pids[await conn.fetchval("SELECT pg_backend_pid()")] = name

            async def all_killed() -> bool:
                for pid, name in pids.items():
                    if await backend_alive(clusters[name], pid):
                        return False
                return True

            await wait_for(all_killed, timeout=60, interval=0.2, what="every victim killed")

            def healthy_kept_sweeping() -> bool:
                now = metric(port, "pg_watchdog_sweeps_total")
                return all(now.get(n, 0) >= before[n] + 5 for n in ("healthy", "flooded"))

            await wait_for(healthy_kept_sweeping, timeout=60, interval=0.2,
                           what="5 more sweeps of each healthy target")
            # All that while the hung target's sweep was still in flight: its up gauge is
            # written when a sweep ends, and its held connection stays open until the timeout.
            during = metric(port, "pg_watchdog_target_up")

            def refused() -> bool:
                return metric(port, "pg_watchdog_target_up").get("refusing") == 0

            await wait_for(refused, timeout=60, interval=0.2, what="the stopped target down")
            after = metric(port, "pg_watchdog_sweeps_total")
            assert daemon.alive(), daemon.log()
        finally:
            clusters["hung"].resume()
            for conn in victims:
                conn.terminate()
        assert daemon.stop() == 0, daemon.log()

    records = [r for r in audit_records(audit) if r["outcome"] == "terminated"]
    assert {r["pid"]: r["target"] for r in records} == pids
    # The sick ones did not sweep while the others did (their sweeps failed or hung).
    assert after["hung"] == before["hung"]
    assert after["refusing"] == before["refusing"]
    assert during["hung"] == 1, "the healthy targets waited for the hung one's sweep"
    # Its sweeps (every second, as the others') hung: none completed while they swept 5+ times.
    assert "refusing:" in daemon.log()


async def test_hanging_name_lookups_hold_one_thread_each_and_spare_the_default_pool(
    pg: TempCluster, monkeypatch: Any
) -> None:
    release = threading.Event()
    hanging: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any) -> Any:
        if str(host).endswith(".slow.invalid"):  # a DNS server that never answers
            hanging.append(str(host))
            release.wait(120)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    loop = asyncio.get_running_loop()
    resolver = Resolver(threads=4)
    resolver.install(loop)
    try:
        # Three targets behind the dead DNS, each retrying ten times with a short timeout.
        for _ in range(10):
            for i in range(3):
                dsn = f"postgresql://watchdog@db{i}.slow.invalid:5432/postgres"
                with contextlib.suppress(TimeoutError, OSError):
                    await asyncpg.connect(dsn, timeout=0.05)
        await wait_for(lambda: len(hanging) >= 3, timeout=30, what="three lookups hanging")
        # The default executor (asyncio.to_thread: the audit log's writes) is free.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "done"), 30) == "done"
        # And another target, by name, still resolves and connects.
        conn = await asyncpg.connect(f"postgresql://postgres@localhost:{pg.port}/postgres",
                                     timeout=30)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
        assert sorted(hanging) == [f"db{i}.slow.invalid" for i in range(3)]
    finally:
        release.set()
        resolver.close()
        with contextlib.suppress(AttributeError):
            del loop.getaddrinfo  # type: ignore[method-assign]
