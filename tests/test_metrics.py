"""watchdog.alerts.metrics: real sweeps on a real server, scraped over HTTP like Prometheus does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import connect, free_port, wait_for
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from watchdog.alerts.metrics import Metrics
from watchdog.audit.log import AuditLog
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import Config, load_config
from watchdog.core.decide import decide
from watchdog.pg.connect import connect as connect_target
from watchdog.pg.connect import server_address
from watchdog.pg.snapshot import take_snapshot
from watchdog.service.sweep import SweepReport, sweep_target

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def roles(pg: TempCluster) -> TempCluster:
    pg.psql(
        "CREATE ROLE watchdog LOGIN; GRANT pg_monitor, pg_signal_backend TO watchdog;"
        "CREATE ROLE app LOGIN;"
    )
    return pg


@pytest.fixture
def make_metrics() -> Iterator[Callable[[Config], Metrics]]:
    made: list[Metrics] = []

    def factory(config: Config) -> Metrics:
        metrics = Metrics(config)
        made.append(metrics)
        return metrics

    try:
        yield factory
    finally:
        for metrics in made:
            metrics.close()


def write_config(tmp_path: Path, port: int, *, listen: int | None, target: str = "main") -> Config:
    metrics = f"metrics:\n  listen: 127.0.0.1:{listen}\n" if listen else ""
    path = tmp_path / f"policies-{target}.yaml"
    path.write_text(
        f"""\
targets:
  - name: {target}
    dsn: postgresql://watchdog@127.0.0.1:{port}/postgres
policies:
  - name: idle
    state: idle
    longer_than: 1s
    applications: ["victim*"]
audit:
  path: {tmp_path / "audit.jsonl"}
{metrics}"""
    )
    return load_config(str(path))


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def count(report: SweepReport, state: str) -> int:
    return sum(
        1
        for s in report.snapshot.sessions
        if s.backend_type == "client backend" and s.state == state
    )


class Watch:
    """The monitoring side of target ``main``: its held connection, audit log and sweeps."""

    def __init__(self, config: Config, conn: Any, server: str) -> None:
        self.config, self.conn, self.server = config, conn, server
        self.audit = AuditLog(config.audit.path)

    async def sweep(self) -> SweepReport:
        return await sweep_target(
            self.conn, self.server, self.config, self.config.target("main"), self.audit
        )

    async def wait_until(self, predicate: Callable[[Any], bool], what: str) -> None:
        async def check() -> bool:
            return predicate(await take_snapshot(self.conn))

        await wait_for(check, timeout=10, what=what)


@contextlib.asynccontextmanager
async def watching(config: Config) -> AsyncIterator[Watch]:
    conn = await connect_target(config.target("main"))
    try:
        yield Watch(config, conn, await server_address(conn))
    finally:
        await conn.close()


async def test_scrape_shows_a_real_sweep(
    roles: TempCluster, tmp_path: Path, make_metrics: Callable[[Config], Metrics]
) -> None:
    port = free_port()
    config = write_config(tmp_path, roles.port, listen=port)
    metrics = make_metrics(config)
    metrics.start()
    victims = [await connect(roles, "app", application_name=f"victim-{i}") for i in range(2)]
    bystander = await connect(roles, "app", application_name="bystander")
    try:
        await bystander.execute("BEGIN; SELECT 1")  # idle in transaction, spared
        async with watching(config) as watch:
            await watch.wait_until(
                lambda snap: len(decide(snap, config, "main").actions) == 2, "2 victims due"
            )
            report = await watch.sweep()
            metrics.swept(report)
            metrics.target_up("main", True, True)
            first = await asyncio.to_thread(scrape, port)

            await bystander.execute("ROLLBACK")
            await watch.wait_until(
                lambda snap: (
                    not any(s.application_name.startswith("victim") for s in snap.sessions)
                ),
                "victims gone",
            )
            later = await watch.sweep()
            metrics.swept(later)
            second = await asyncio.to_thread(scrape, port)
    finally:
        for c in [*victims, bystander]:
            c.terminate()

    assert [o.outcome for o in report.outcomes] == ["terminated"] * 2
    assert count(report, "idle") >= 2  # the victims, at the time of the snapshot
    labels = {"target": "main", "policy": "idle", "outcome": "terminated"}
    assert value(first, "pg_watchdog_actions_total", **labels) == 2
    assert value(first, "pg_watchdog_sweeps_total", target="main") == 1
    assert value(first, "pg_watchdog_sweep_duration_seconds_count", target="main") == 1
    assert value(first, "pg_watchdog_connections", target="main", state="idle") == count(
        report, "idle"
    )
    assert value(first, "pg_watchdog_connections", target="main", state="active") >= 1
    assert value(first, "pg_watchdog_connections", target="main", state="idle in transaction") == 1
    assert value(first, "pg_watchdog_connections", target="main", state="other") == 0
    assert value(first, "pg_watchdog_max_connections", target="main") == 30
    assert value(first, "pg_watchdog_connection_slots", target="main") == 27
    assert value(first, "pg_watchdog_target_up", target="main") == 1
    assert value(first, "pg_watchdog_leader", target="main") == 1
    # Its own registry: nothing of the process-wide default one is served.
    assert not any(name.startswith(("process_", "python_")) for name, _ in first)

    # The next sweep: the victims are gone and the transaction ended, and the gauges say so.
    assert value(second, "pg_watchdog_sweeps_total", target="main") == 2
    assert value(second, "pg_watchdog_actions_total", **labels) == 2
    assert value(second, "pg_watchdog_connections", target="main", state="idle") == count(
        later, "idle"
    )
    assert count(later, "idle") == count(report, "idle") - 2 + 1  # the bystander is idle now
    assert value(second, "pg_watchdog_connections", target="main", state="idle in transaction") == 0


def test_own_registry_leaves_the_global_one_alone(
    tmp_path: Path, make_metrics: Callable[[Config], Metrics]
) -> None:
    make_metrics(write_config(tmp_path, 9, listen=free_port()))
    assert REGISTRY.get_sample_value("pg_watchdog_sweeps_total", {"target": "main"}) is None
    assert not any(m.name.startswith("pg_watchdog") for m in REGISTRY.collect())


def test_without_a_metrics_section_nothing_is_served_or_recorded(
    tmp_path: Path, make_metrics: Callable[[Config], Metrics]
) -> None:
    metrics = make_metrics(write_config(tmp_path, 9, listen=None))
    metrics.start()
    metrics.target_up("main", True, False)
    assert not metrics.enabled
    assert metrics._server is None
    assert b'target="main"' not in generate_latest(metrics.registry)


def test_close_stops_serving(tmp_path: Path, make_metrics: Callable[[Config], Metrics]) -> None:
    port = free_port()
    metrics = make_metrics(write_config(tmp_path, 9, listen=port))
    metrics.start()
    metrics.target_up("main", False, False)
    assert value(scrape(port), "pg_watchdog_target_up", target="main") == 0
    metrics.close()
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_a_taken_port_is_logged_not_fatal(
    tmp_path: Path, make_metrics: Callable[[Config], Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    config = write_config(tmp_path, 9, listen=port)
    make_metrics(config).start()
    second = make_metrics(config)
    second.start()
    assert second._server is None
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"cannot listen on 127.0.0.1:{port}" in record.getMessage()


def test_reload_forgets_removed_targets(
    tmp_path: Path, make_metrics: Callable[[Config], Metrics]
) -> None:
    port = free_port()
    metrics = make_metrics(write_config(tmp_path, 9, listen=port))
    metrics.start()
    metrics.target_up("main", True, True)
    assert value(scrape(port), "pg_watchdog_target_up", target="main") == 1
    metrics.configure(write_config(tmp_path, 9, listen=port, target="other"))
    assert not any(dict(labels).get("target") == "main" for _, labels in scrape(port))
