"""The exhaustion forecast end to end: a real `pg-watchdog run`, a real server with 60 slots,
the real sentry-sdk posting to a local endpoint, and the real /metrics.

The flat test holds the server at 85 % for a minute of sweeps (about 60 s of wall time per
major): the claim is about a minute, and a shorter hold would prove less.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import MAJORS
from daemon import Daemon, write_config
from helpers import connect, free_port, sweeps_ran, wait_for
from prometheus_client.parser import text_string_to_metric_families
from scenario import BIN, cli_env, run_cli, setup_roles
from sentry_endpoint import SentryEndpoint

from watchdog.audit.forecast_log import forecast_path
from watchdog.commands.demo.tempcluster import ClusterError, TempCluster, start_cluster

LEAKY = "leaky-app"
ETA = "pg_watchdog_exhaustion_eta_seconds"


@pytest.fixture(scope="module", params=MAJORS, ids=[f"pg{m}" for m in MAJORS])
def pg60(request: pytest.FixtureRequest) -> Iterator[TempCluster]:
    """A cluster with max_connections = 60 (57 ordinary slots), one per module and major."""
    try:
        cluster = start_cluster(request.param, max_connections=60)
    except ClusterError as exc:
        pytest.fail(f"PostgreSQL {request.param} cluster did not start: {exc}", pytrace=False)
    setup_roles(cluster)
    try:
        yield cluster
    finally:
        cluster.cleanup()


def config(tmp_path: Path, cluster: TempCluster, sentry: SentryEndpoint, port: int) -> Path:
    # Sweeps every second; nothing killed during the test (idle 10m).
    return write_config(
        tmp_path / "policies.yaml", cluster, idle="10m", interval="1s",
        extra=(f"alerts:\n  sentry: {{dsn: '{sentry.dsn}', environment: test}}\n"
               f"  exhaustion_within: 10m\nmetrics:\n  listen: 127.0.0.1:{port}\n"),
    )


def exhaustion_events(sentry: SentryEndpoint) -> list[dict[str, Any]]:
    return [e for e in sentry.events() if (e.get("tags") or {}).get("kind") == "exhaustion"]


def sample(port: int, name: str) -> float | None:
    """The value of metric ``name`` for target main, None while absent or not served yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("target") == "main":
                return float(s.value)
    return None


def eta_gauge(port: int) -> float | None:
    """The exported estimate of target main, None while absent."""
    return sample(port, ETA)


async def swept(cluster: TempCluster, port: int, n: int, timeout: float) -> None:
    """Wait for ``n`` more completed sweeps. The server sees a few of them (the snapshot
    statement is visible only for an instant between the sweep's other statements, so
    counting every one there misses most); the service's own counter counts them all."""
    start = sample(port, "pg_watchdog_sweeps_total") or 0.0
    await sweeps_ran(cluster, 3, timeout=timeout)
    await wait_for(lambda: (sample(port, "pg_watchdog_sweeps_total") or 0.0) >= start + n,
                   timeout=timeout, interval=0.2, what=f"{n} sweeps")


async def capacity(cluster: TempCluster) -> int:
    conn = await connect(cluster)
    try:
        return int(await conn.fetchval(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - coalesce(current_setting('reserved_connections', true), '0')::int"))
    finally:
        await conn.close()


async def used(cluster: TempCluster) -> int:
    """Client backends, as the watchdog counts them (this asking session included)."""
    conn = await connect(cluster)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"))
    finally:
        await conn.close()


async def test_a_leak_raises_one_event_naming_it_before_the_first_refusal(
        pg60: TempCluster, tmp_path: Path) -> None:
    port = free_port()
    loop = asyncio.get_running_loop()
    conns: list[asyncpg.Connection] = []
    with SentryEndpoint() as sentry, Daemon(cfg := config(tmp_path, pg60, sentry, port)) as daemon:
        # `status --watch 1` beside the service: it gathers a history of its own. Its rounds
        # go to a file: a pipe nobody reads would block it.
        rounds_path = tmp_path / "status.jsonl"
        with rounds_path.open("wb") as rounds_file:
            status = await asyncio.create_subprocess_exec(
                str(BIN), "status", "-c", str(cfg), "--watch", "1", "--json", env=cli_env(),
                stdout=rounds_file, stderr=asyncio.subprocess.DEVNULL)
        try:
            # A baseline as long as the shortest window (10 s) before the leak begins.
            await swept(pg60, port, 15, timeout=60)
            assert eta_gauge(port) is None, "nothing grows yet: no estimate"
            refused_at: datetime | None = None
            gauge: float | None = None
            start = loop.time()
            while refused_at is None:
                # One connection every 0.5 s, on schedule, toward 57 ordinary slots.
                await asyncio.sleep(max(0.0, start + 0.5 * len(conns) - loop.time()))
                try:
                    conns.append(await connect(pg60, "app", application_name=LEAKY))
                except asyncpg.TooManyConnectionsError:
                    refused_at = datetime.now(UTC)
                if gauge is None:
                    gauge = eta_gauge(port)
                assert len(conns) < 60, "the server never refused a connection"
            # The event was raised (the SDK stamps it) before the first refusal.
            await wait_for(lambda: bool(exhaustion_events(sentry)), timeout=10,
                           what=f"the exhaustion event; log:\n{daemon.log()[-3000:]}")
            raised_at = datetime.fromisoformat(exhaustion_events(sentry)[0]["timestamp"])
            assert raised_at < refused_at, (raised_at, refused_at, daemon.log()[-3000:])
            assert gauge is not None and 0 <= gauge < 60, gauge
            # Full from here on: the forecast stays crossed, no second event. Poll the log for
            # sweeps that saw it full, which proves the forecast went on being fed.
            await swept(pg60, port, 5, timeout=30)
        finally:
            for c in conns:
                c.terminate()
            status.send_signal(signal.SIGINT)
            await asyncio.wait_for(status.wait(), 30)
        assert daemon.stop() == 0
        log = daemon.log()
        events = exhaustion_events(sentry)
    # status --watch showed the estimate and the leaking application while it filled.
    rounds = [json.loads(line)["targets"][0] for line in rounds_path.read_text().splitlines()]
    forecasts = [r["forecast"] for r in rounds if "forecast" in r]  # not: a round that failed
    growing = [f for f in forecasts if f["growing"]]
    assert growing, forecasts[-5:]
    assert growing[0]["applications"][0]["name"] == LEAKY and growing[0]["eta_s"] < 60
    assert len(events) == 1, events
    event = events[0]
    assert event["level"] == "error"
    assert event["fingerprint"] == ["pg-watchdog", "exhaustion", "main"]
    assert event["tags"] == {"target": "main", "kind": "exhaustion"}
    assert f"'{LEAKY}'" in event["message"]
    assert event["message"].startswith("main: connection slots run out in ~")
    context = event["contexts"]["pg_watchdog"]
    assert context["growing_applications"][0]["name"] == LEAKY
    assert 60 <= context["growing_applications"][0]["per_min"] <= 240  # 120/min, as fitted
    assert context["growing_clients"][0]["name"] == "127.0.0.1"
    assert 0 < context["eta_s"] < 60
    assert "connection slots run out" in log
    # The crossing is recorded beside the audit log, not in it, and advise tells it.
    [crossed] = [json.loads(line) for line in
                 forecast_path(tmp_path / "audit.jsonl").read_text().splitlines()]
    assert crossed["event"] == "crossed" and crossed["applications"][0]["name"] == LEAKY
    assert not (tmp_path / "audit.jsonl").exists() or all(
        "event" not in json.loads(line)
        for line in (tmp_path / "audit.jsonl").read_text().splitlines())
    advice = await run_cli("advise", "-c", tmp_path / "policies.yaml", "--json")
    assert advice.rc == 0, advice.stderr
    [finding] = [f for f in advice.json()["findings"] if f["id"] == "exhaustion_forecast"]
    assert finding["target"] == "main"
    assert any(LEAKY in line and "/min" in line for line in finding["evidence"])
    assert any("filling at" in line for line in finding["evidence"])


async def test_a_server_held_flat_at_85_percent_for_a_minute_raises_nothing(
        pg60: TempCluster, tmp_path: Path) -> None:
    port = free_port()
    slots = await capacity(pg60)
    goal = round(0.85 * slots)  # 48 of 57
    conns: list[asyncpg.Connection] = []
    try:
        # Filled before the watchdog starts (its own connection makes the last one), so the
        # climb is not in its history; then churn: one closes, another opens, every second.
        while await used(pg60) < goal - 1:
            conns.append(await connect(pg60, "app", application_name="steady-app"))
        with SentryEndpoint() as sentry, Daemon(config(tmp_path, pg60, sentry, port)) as daemon:

            async def churn() -> None:
                while True:
                    await asyncio.sleep(1.0)
                    conns.pop(0).terminate()
                    conns.append(await connect(pg60, "app", application_name="steady-app"))

            task = asyncio.create_task(churn())
            try:
                await swept(pg60, port, 60, timeout=180)  # a minute of sweeps at 85 %
                assert not task.done(), task
            finally:
                task.cancel()
            # Alerts do reach Sentry meanwhile: 84 % is above connections_above (80 %).
            await wait_for(lambda: any("of connection slots" in e["message"]
                                       for e in sentry.events()), timeout=10,
                           what="the saturation event")
            assert eta_gauge(port) is None
            look = await run_cli("status", "-c", tmp_path / "policies.yaml", "--json")
            assert look.json()["targets"][0]["forecast"] == {"needs_history": True,
                                                              "growing": False}
            assert daemon.stop() == 0
            assert exhaustion_events(sentry) == [], daemon.log()
            assert not forecast_path(tmp_path / "audit.jsonl").exists()
    finally:
        for c in conns:
            c.terminate()
