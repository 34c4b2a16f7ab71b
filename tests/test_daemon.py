"""The service under systemd's eye: notify protocol, reload, restarts, exhaustion, failover, hangs.

Every test runs the real `pg-watchdog run` process (or the real Service) against
real servers, with a real datagram socket standing in for systemd.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from conftest import MAJORS
from daemon import Daemon, audit_records, backend_alive, write_config
from helpers import connect, sweeps_ran, wait_for
from notify_listener import NotifyListener
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import load_config
from watchdog.service.scheduler import Service


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    return pg


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    with NotifyListener() as lst:
        yield lst


async def _idle_app_session(cluster: TempCluster) -> tuple[asyncpg.Connection, int]:
    conn = await connect(cluster, "app", application_name="leaky")
    return conn, await conn.fetchval("SELECT pg_backend_pid()")


async def _dies(cluster: TempCluster, pid: int, timeout: float) -> None:
    async def gone() -> bool:
        return not await backend_alive(cluster, pid)

    await wait_for(gone, timeout=timeout, interval=0.1, what=f"backend {pid} to be terminated")


async def test_notify_ready_watchdog_reload_stop(
    cluster: TempCluster, tmp_path: Path, listener: NotifyListener
) -> None:
    cfg = write_config(tmp_path / "p.yaml", cluster, idle="1h")
    with Daemon(cfg, listener.environ(WATCHDOG_USEC="1000000")) as d:
        ready = await listener.expect("READY", timeout=30)
        assert ready["READY"] == "1"
        assert "watching 1 targets" in ready.get("STATUS", "")
        # Pings keep coming (at half of WATCHDOG_USEC; the gaps are bench/service_timing.py's).
        for _ in range(4):
            await listener.expect("WATCHDOG", timeout=10)

        d.proc.send_signal(signal.SIGHUP)
        reloading = await listener.expect("RELOADING", timeout=10)
        usec = int(reloading["MONOTONIC_USEC"])
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 5
        await listener.expect("READY", timeout=10)

        d.proc.send_signal(signal.SIGTERM)
        await listener.expect("STOPPING", timeout=10)
        assert d.wait(timeout=30) == 0, d.log()


async def test_pings_stop_when_sweeps_cannot_run(
    cluster: TempCluster, tmp_path: Path, listener: NotifyListener,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    for key, value in listener.environ(WATCHDOG_USEC="400000").items():
        monkeypatch.setenv(key, value)
    cfg = write_config(tmp_path / "p.yaml", cluster, idle="1h")
    svc = Service(load_config(str(cfg)), str(cfg), dry_run=False)
    task = asyncio.create_task(svc.run())

    def withheld() -> int:
        return sum("withholding the systemd watchdog ping" in r.getMessage()
                   for r in caplog.records)

    try:
        await listener.expect("READY", timeout=30)
        await listener.expect("WATCHDOG", timeout=30)
        # A wedged scheduler: no sweep starts any more.
        svc.scheduler.pause()
        await wait_for(lambda: not svc.healthy(), timeout=30, what="health to fail")
        # Pings are sent synchronously: any sent before health failed is queued by now.
        listener.drain()
        pings_before = sum("WATCHDOG" in m for m in listener.messages)
        # Proof that the pinger ran meanwhile, however slowly: it withheld three pings.
        seen = withheld()
        await wait_for(lambda: withheld() >= seen + 3, timeout=30, what="three withheld pings")
        listener.drain()
        assert sum("WATCHDOG" in m for m in listener.messages) == pings_before
        # Sweeps run again: pings come back.
        svc.scheduler.resume()
        await listener.expect("WATCHDOG", timeout=10)
    finally:
        svc.stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def test_reload_changes_policies_and_rejects_invalid(
    cluster: TempCluster, tmp_path: Path, listener: NotifyListener
) -> None:
    cfg = write_config(tmp_path / "p.yaml", cluster, idle="1h")
    conn, pid = await _idle_app_session(cluster)
    with Daemon(cfg, listener.environ()) as d:
        await listener.expect("READY", timeout=30)
        await sweeps_ran(cluster, 3)  # several sweeps under the old policy
        assert await backend_alive(cluster, pid)

        write_config(cfg, cluster, idle="1s")
        d.proc.send_signal(signal.SIGHUP)
        await listener.expect("READY", timeout=10)
        await _dies(cluster, pid, timeout=10)

        cfg.write_text(cfg.read_text().replace("longer_than: 1s", "longer_than: '1 second'"))
        d.proc.send_signal(signal.SIGHUP)
        await listener.expect("READY", timeout=10)
        await wait_for(lambda: "reload rejected" in d.log(), timeout=30, what="reload rejected")
        assert "p.yaml:" in d.log() and "longer_than" in d.log()
        assert d.alive()
        # The previous policies keep working.
        conn2, pid2 = await _idle_app_session(cluster)
        await _dies(cluster, pid2, timeout=10)
        assert d.stop() == 0
    await conn.close(timeout=1)
    await conn2.close(timeout=1)


async def test_server_restart_is_survived(make_cluster, tmp_path: Path) -> None:
    c = make_cluster(18)
    setup_roles(c)
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s")
    with Daemon(cfg) as d:
        _, pid = await _idle_app_session(c)
        await _dies(c, pid, timeout=60)
        c.restart()
        await wait_for(
            lambda: (
                "reconnected" in d.log() or "connected to" in d.log().split("terminated", 1)[-1]
            ),
            timeout=20,
            what="reconnect",
        )
        assert d.alive()
        _, pid2 = await _idle_app_session(c)
        await _dies(c, pid2, timeout=60)
        assert d.alive()
        assert d.stop() == 0
    pids = {
        r["pid"] for r in audit_records(tmp_path / "audit.jsonl") if r["outcome"] == "terminated"
    }
    assert {pid, pid2} <= pids


async def _fill(cluster: TempCluster) -> tuple[list[asyncpg.Connection], str]:
    """Open app sessions until the server refuses with 53300; the FATAL text."""
    conns = []
    for _ in range(100):
        try:
            conns.append(await connect(cluster, "app", application_name="leaky"))
        except asyncpg.TooManyConnectionsError as exc:
            return conns, str(exc)
    raise AssertionError("the server never filled up")


@pytest.mark.parametrize("major", MAJORS)
async def test_exhausted_server_is_healed_by_running_watchdog(
    make_cluster, tmp_path: Path, major: int
) -> None:
    settings = {"reserved_connections": "2"} if major >= 16 else {}
    c = make_cluster(major, max_connections=12, settings=settings)
    setup_roles(c)
    cfg = write_config(tmp_path / "p.yaml", c, idle="2s")
    with Daemon(cfg) as d:
        await wait_for(lambda: "connected to" in d.log(), timeout=20, what="watchdog connected")
        conns, fatal = await _fill(c)
        assert "remaining connection slots are reserved" in fatal

        async def can_connect() -> bool:
            try:
                conn = await connect(c, "app", application_name="newcomer")
            except asyncpg.TooManyConnectionsError:
                return False
            await conn.close()
            return True

        # The FATAL proved it full; whether a slot is free yet is the watchdog's doing.
        await wait_for(can_connect, timeout=60, interval=0.2, what="a free slot")
        assert d.stop() == 0
    assert len(audit_records(tmp_path / "audit.jsonl")) >= 1
    for conn in conns:
        conn.terminate()


# 16 is the first major with reserved_connections.
@pytest.mark.parametrize("major", [m for m in MAJORS if m >= 16] or [18])
async def test_watchdog_started_on_full_server_gets_in_on_reserved_slots(
    make_cluster, tmp_path: Path, major: int
) -> None:
    c = make_cluster(major, max_connections=12, settings={"reserved_connections": "2"})
    setup_roles(c)
    conns, fatal = await _fill(c)
    assert "remaining connection slots are reserved" in fatal
    await asyncio.sleep(2.1)  # let them age past the threshold
    cfg = write_config(tmp_path / "p.yaml", c, idle="2s")
    with Daemon(cfg) as d:
        await wait_for(
            lambda: len(audit_records(tmp_path / "audit.jsonl")) > 0,
            timeout=20,
            what="heal on a full server",
        )
        assert d.stop() == 0
    assert all(r["outcome"] == "terminated" for r in audit_records(tmp_path / "audit.jsonl"))
    for conn in conns:
        conn.terminate()


async def test_watchdog_started_on_full_pg15_says_what_to_do(make_cluster, tmp_path: Path) -> None:
    c = make_cluster(15, max_connections=8)
    setup_roles(c)
    conns, _ = await _fill(c)
    cfg = write_config(tmp_path / "p.yaml", c, idle="2s")
    with Daemon(cfg) as d:
        await wait_for(
            lambda: "pg_use_reserved_connections" in d.log(), timeout=20, what="advice in the log"
        )
        assert d.alive()
        assert d.stop() == 0
    for conn in conns:
        conn.terminate()


async def test_two_instances_one_acts_and_the_other_takes_over(
    cluster: TempCluster, tmp_path: Path
) -> None:
    cfg_a = write_config(tmp_path / "a.yaml", cluster, idle="1s", audit=tmp_path / "a.jsonl")
    cfg_b = write_config(tmp_path / "b.yaml", cluster, idle="1s", audit=tmp_path / "b.jsonl")
    with Daemon(cfg_a) as a:
        await wait_for(lambda: "this instance acts" in a.log(), timeout=20, what="a leads")
        with Daemon(cfg_b) as b:
            await wait_for(lambda: "observing" in b.log(), timeout=20, what="b observes")
            victims = [await _idle_app_session(cluster) for _ in range(3)]
            for _, pid in victims:
                await _dies(cluster, pid, timeout=10)
            assert {r["watchdog_pid"] for r in audit_records(tmp_path / "a.jsonl")} == {a.pid}
            assert audit_records(tmp_path / "b.jsonl") == []

            a.kill()  # SIGKILL: the leader's connection and its lock go away
            _, pid = await _idle_app_session(cluster)
            await _dies(cluster, pid, timeout=30)  # how fast: bench/service_timing.py
            await wait_for(
                lambda: audit_records(tmp_path / "b.jsonl"), timeout=30, what="b's record"
            )
            records = audit_records(tmp_path / "b.jsonl")
            assert [r["pid"] for r in records] == [pid]
            assert records[0]["watchdog_pid"] == b.pid
            assert b.stop() == 0


async def test_hung_server_does_not_wedge_the_scheduler(
    make_cluster, tmp_path: Path, listener: NotifyListener
) -> None:
    c = make_cluster(18)
    setup_roles(c)
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s")
    with Daemon(cfg, listener.environ(WATCHDOG_USEC="2000000")) as d:
        await listener.expect("READY", timeout=30)
        await wait_for(lambda: "connected to" in d.log(), timeout=20, what="connected")
        c.pause()
        try:
            # The sweep times out (5 s at a 1 s interval) and the service keeps going.
            await wait_for(lambda: "timed out" in d.log(), timeout=20, what="sweep timeout")
            listener.drain()
            pings = sum("WATCHDOG" in m for m in listener.messages)

            def pinged_twice() -> bool:
                listener.drain()
                return sum("WATCHDOG" in m for m in listener.messages) >= pings + 2

            # Pings go on (every second) while the sweeps time out.
            await wait_for(pinged_twice, timeout=30, what="pings to go on")
            assert d.alive()
        finally:
            c.resume()
        _, pid = await _idle_app_session(c)
        await _dies(c, pid, timeout=40)
        assert d.stop() == 0
