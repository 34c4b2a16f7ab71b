"""A reload runs the checks a start makes, and one that could not start is rejected whole:
one line logged, one alert, systemd READY with the status saying so, and the running policies
keep acting. Also: an alias bomb in the reloaded file is parsed off the event loop and capped,
so the sweeps go on meanwhile (real `pg-watchdog run`, real Sentry SDK into a local endpoint)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, audit_records
from helpers import connect, wait_for
from notify_listener import NotifyListener
from reloading import killed, leader, policy
from scenario import setup_roles
from sentry_endpoint import SentryEndpoint

from watchdog.commands.demo.tempcluster import TempCluster

REJECTED = "reload rejected, keeping the running policies: "
BOMB = Path(__file__).parent / "invalid_configs" / "yaml_alias_bomb.yaml"


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    return pg


@pytest.fixture
def sentry() -> Iterator[SentryEndpoint]:
    with SentryEndpoint() as endpoint:
        yield endpoint


def _alerts(sentry: SentryEndpoint) -> str:
    return f"alerts: {{sentry: {{dsn: '{sentry.dsn}', environment: test}}}}"


async def _rejected(
    d: Daemon, listener: NotifyListener, sentry: SentryEndpoint, reason: str
) -> None:
    """SIGHUP; the reload is rejected with one line naming ``reason``, one alert, READY."""
    d.proc.send_signal(signal.SIGHUP)
    await listener.expect("RELOADING", timeout=10)
    ready = await listener.expect("READY", timeout=30)
    assert ready.get("STATUS") == "reload rejected; running the previous policies", ready
    lines = [x for x in d.log().splitlines() if "reload rejected" in x]
    assert len(lines) == 1, lines
    assert REJECTED in lines[0] and reason in lines[0], lines[0]
    assert "reloaded " not in d.log()

    def reload_events() -> list[dict[str, Any]]:
        return [e for e in sentry.events() if e.get("tags", {}).get("kind") == "reload"]

    [event] = await asyncio.to_thread(sentry.wait_for, reload_events, 10)
    assert event["message"].startswith(REJECTED) and reason in event["message"], event


async def test_poolers_added_without_psycopg_are_rejected(
    cluster: TempCluster, tmp_path: Path, sentry: SentryEndpoint
) -> None:
    # A psycopg package that cannot be imported shadows the installed one: as if it were not.
    fake = tmp_path / "site" / "psycopg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'psycopg'\")\n")
    cfg = policy(tmp_path / "p.yaml", cluster, extra=_alerts(sentry))
    with NotifyListener() as listener:
        env = {**listener.environ(), "PYTHONPATH": str(fake.parent)}
        with Daemon(cfg, env) as d:
            await listener.expect("READY", timeout=30)
            await leader(cluster)
            policy(cfg, cluster, pooler=True, extra=_alerts(sentry))
            await _rejected(d, listener, sentry, "psycopg is not installed")
            # Still the old policies: no pooler, so the victim is not spared as pooled.
            await killed(cluster, tmp_path / "audit.jsonl")
            assert d.stop() == 0


async def test_unwritable_new_audit_path_is_rejected(
    cluster: TempCluster, tmp_path: Path, sentry: SentryEndpoint
) -> None:
    audit = tmp_path / "audit.jsonl"
    typo = tmp_path / "pg-watchdgo" / "audit.jsonl"  # a directory that does not exist
    cfg = policy(tmp_path / "p.yaml", cluster, audit=audit, extra=_alerts(sentry))
    with NotifyListener() as listener, Daemon(cfg, listener.environ()) as d:
        await listener.expect("READY", timeout=30)
        await leader(cluster)
        policy(cfg, cluster, audit=typo, extra=_alerts(sentry))
        await _rejected(
            d, listener, sentry, f"cannot write audit log {typo}: {typo.parent}: No such file"
        )
        await killed(cluster, audit)  # recorded where it was
        assert d.stop() == 0


async def test_invalid_file_is_one_line_and_one_alert(
    cluster: TempCluster, tmp_path: Path, sentry: SentryEndpoint
) -> None:
    cfg = policy(tmp_path / "p.yaml", cluster, extra=_alerts(sentry))
    with NotifyListener() as listener, Daemon(cfg, listener.environ()) as d:
        await listener.expect("READY", timeout=30)
        cfg.write_text(cfg.read_text().replace("longer_than: 1s", "longer_than: '1 second'"))
        await _rejected(d, listener, sentry, "policies[0].longer_than")
        assert d.stop() == 0


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_alias_bomb_reload_keeps_the_service_sweeping(
    cluster: TempCluster, tmp_path: Path, sentry: SentryEndpoint
) -> None:
    audit = tmp_path / "audit.jsonl"
    cfg = policy(tmp_path / "p.yaml", cluster, interval="250ms", extra=_alerts(sentry))
    with NotifyListener() as listener, Daemon(cfg, listener.environ()) as d:
        await listener.expect("READY", timeout=30)
        await leader(cluster)
        before = _peak_rss_mb(d.pid)
        cfg.write_text(BOMB.read_text())
        victim = await connect(cluster, "app", application_name="leaky")
        pid = victim.get_server_pid()
        d.proc.send_signal(signal.SIGHUP)
        await listener.expect("RELOADING", timeout=10)
        # Due 1 s from now, while the file is being parsed: killed as usual. A parse on the
        # event loop (expanding a million nodes) stalled every sweep for 12-16 s here.
        await wait_for(
            lambda: any(r["pid"] == pid for r in audit_records(audit)),
            timeout=8,
            interval=0.1,
            what="the victim killed during the reload",
        )
        ready = await listener.expect("READY", timeout=30)
        assert ready.get("STATUS") == "reload rejected; running the previous policies"
        [line] = [x for x in d.log().splitlines() if "reload rejected" in x]
        assert f"{cfg}:19:23: exclude.applications[4][3]: invalid YAML: at this alias" in line
        peak = _peak_rss_mb(d.pid)
        assert peak < before + 100, (before, peak)
        assert d.stop() == 0
    victim.terminate()
