"""/healthz and /readyz on the metrics listener of the real `pg-watchdog run`, against real
servers: a target never reached keeps it unready, a sweep hung past its timeout makes it
unhealthy, and both recover."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemon import Daemon
from helpers import free_port, sweeps_ran, wait_for
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    return pg


def status(port: int, path: str, method: str = "GET") -> int | None:
    """The HTTP status of one probe (None while nothing listens)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def body(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())


def policies(path: Path, port: int, targets: dict[str, str], interval: str = "1s") -> Path:
    listed = "".join(
        f"  - name: {name}\n    dsn: '{dsn}'\n    interval: {interval}\n"
        for name, dsn in targets.items()
    )
    path.write_text(
        f"""targets:
{listed}policies:
  - name: idle
    state: idle
    longer_than: 1h
    users: [app]
audit:
  path: {path.parent / "audit.jsonl"}
metrics:
  listen: 127.0.0.1:{port}
"""
    )
    return path


async def probes_are(port: int, d: Daemon, healthz: int, readyz: int, timeout: float) -> None:
    def now() -> bool:
        assert d.alive(), d.log()
        return (status(port, "/healthz"), status(port, "/readyz")) == (healthz, readyz)

    await wait_for(now, timeout=timeout, interval=0.2, what=f"healthz {healthz}, readyz {readyz}")


def nowhere() -> str:
    """A DSN on a loopback port nothing listens on: refused at once."""
    return f"postgresql://watchdog@127.0.0.1:{free_port()}/postgres"


async def test_readyz_waits_for_every_target_and_follows_reloads(
    cluster: TempCluster, tmp_path: Path
) -> None:
    port = free_port()
    cfg = policies(tmp_path / "p.yaml", port, {"main": cluster.dsn("watchdog"), "later": nowhere()})
    with Daemon(cfg) as d:
        # A target that is down keeps the scheduler healthy (its sweeps fail fast) but the
        # instance unready: it could not act on that server.
        await probes_are(port, d, 200, 503, timeout=30)
        await sweeps_ran(cluster, 3)
        assert status(port, "/readyz") == 503
        assert "not ready" in body(port, "/readyz")
        assert "refused" in d.log() or "later" in d.log()

        policies(cfg, port, {"main": cluster.dsn("watchdog"), "later": cluster.dsn("watchdog")})
        d.proc.send_signal(signal.SIGHUP)
        await probes_are(port, d, 200, 200, timeout=30)
        assert status(port, "/readyz", "HEAD") == 200
        assert "pg_watchdog_target_up" in body(port, "/metrics")  # the same listener

        # A target added by a reload has not been reached yet.
        policies(cfg, port, {"main": cluster.dsn("watchdog"), "new": nowhere()})
        d.proc.send_signal(signal.SIGHUP)
        await probes_are(port, d, 200, 503, timeout=30)
        assert d.stop() == 0


async def test_healthz_fails_while_a_sweep_hangs_past_its_timeout(
    cluster: TempCluster, tmp_path: Path
) -> None:
    port = free_port()
    # A hung server accepts the TCP connection and never answers the startup packet: the
    # reconnect waits for connect_timeout, far past the sweep's own timeout.
    dsn = cluster.dsn("watchdog") + "?connect_timeout=120"
    cfg = policies(tmp_path / "p.yaml", port, {"main": dsn})
    with Daemon(cfg) as d:
        await probes_are(port, d, 200, 200, timeout=30)
        cluster.pause()
        try:
            await probes_are(port, d, 503, 200, timeout=60)
            assert "unhealthy" in body(port, "/healthz")
        finally:
            cluster.resume()
        await probes_are(port, d, 200, 200, timeout=60)
        assert d.stop() == 0
