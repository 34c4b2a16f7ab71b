"""watchdog.alerts.hub with the real sentry-sdk posting to a local endpoint, against real servers.

Every test's endpoint is checked at teardown: no envelope may hold a target's
password, whether from the DSN or from a password_file.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sentry_sdk
from helpers import connect, free_port, wait_for
from sentry_endpoint import SentryEndpoint

from watchdog import __version__
from watchdog.alerts.hub import Alerts
from watchdog.alerts.sentry import monitor_slug
from watchdog.audit.log import AuditError, AuditLog
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import Config, load_config
from watchdog.core.decide import decide
from watchdog.pg.connect import TargetError, server_address
from watchdog.pg.connect import connect as connect_target
from watchdog.pg.snapshot import take_snapshot
from watchdog.service.sweep import SweepReport, sweep_target

PASSWORD = "S3cret:Pw/1"  # the watchdog's roles' own (SCRAM checks it); never in Sentry
FILE_SECRET = "F1leS3cretPw"
MARKER = "secret-query-marker"
SECRETS = (PASSWORD, quote(PASSWORD, safe=""), FILE_SECRET)


# -- fixtures --------------------------------------------------------------------


@pytest.fixture
def sentry() -> Iterator[SentryEndpoint]:
    with SentryEndpoint() as endpoint:
        yield endpoint
        for body in endpoint.bodies():
            for secret in SECRETS:
                assert secret.encode() not in body, f"a target secret reached Sentry: {body!r}"
        assert not endpoint.errors


@pytest.fixture
def make_alerts() -> Iterator[Callable[[Config], Alerts]]:
    """Alerts that are closed at teardown, leaving sentry-sdk's global client as it was found."""
    made: list[Alerts] = []

    def factory(config: Config) -> Alerts:
        alerts = Alerts(config)
        made.append(alerts)
        return alerts

    try:
        yield factory
    finally:
        for alerts in made:
            alerts.close()
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


@pytest.fixture(scope="module")
def roles(pg: TempCluster) -> TempCluster:
    pg.psql(
        f"CREATE ROLE watchdog LOGIN PASSWORD '{PASSWORD}';"
        " GRANT pg_monitor, pg_signal_backend TO watchdog;"
        f"CREATE ROLE weakdog LOGIN PASSWORD '{PASSWORD}';"
        " GRANT pg_monitor TO weakdog;"  # cannot signal others
        "CREATE ROLE app LOGIN;"
    )
    return pg


def write_config(
    tmp_path: Path,
    cluster: TempCluster,
    sentry: SentryEndpoint | None,
    *,
    user: str = "watchdog",
    dry_run: bool = False,
    query: str = "truncate",
    connections_above: str = "80%",
    audit_path: Path | None = None,
    environment: str = "test",
    details: bool = True,
) -> Config:
    password_file = tmp_path / "spare.password"
    password_file.write_text(FILE_SECRET + "\n")
    sentry_section = (
        f"  sentry:\n    dsn: {sentry.dsn}\n    environment: {environment}\n"
        f"    send_session_details: {str(details).lower()}\n"
        if sentry
        else ""
    )
    path = tmp_path / "policies.yaml"
    path.write_text(
        f"""\
dry_run: {str(dry_run).lower()}
targets:
  - name: main
    dsn: postgresql://{user}:{quote(PASSWORD, safe="")}@127.0.0.1:{cluster.port}/postgres
    interval: 30s
  - name: spare
    dsn: postgresql://watchdog@127.0.0.1:{free_port()}/postgres
    password_file: {password_file}
    interval: 5m
policies:
  - name: idle
    state: idle
    longer_than: 1s
    applications: ["victim*"]
    targets: [main]
audit:
  path: {audit_path or tmp_path / "audit.jsonl"}
  query: {query}
alerts:
{sentry_section}  connections_above: {connections_above}
"""
    )
    return load_config(str(path))


@contextlib.asynccontextmanager
async def sessions(cluster: TempCluster, n: int, app: str = "victim") -> AsyncIterator[list[Any]]:
    """``n`` idle sessions of role ``app`` whose last query carries MARKER."""
    conns: list[Any] = []
    try:
        for i in range(n):
            conns.append(await connect(cluster, "app", application_name=f"{app}-{i}"))
            await conns[-1].execute("SELECT 'secret-query-marker'")
        yield conns
    finally:
        for c in conns:
            c.terminate()


class Watch:
    """The monitoring side of one target: its held connection, audit log and sweeps."""

    def __init__(self, config: Config, conn: Any, server: str) -> None:
        self.config, self.conn, self.server = config, conn, server
        self.target = config.target("main")
        self.audit = AuditLog(config.audit.path)

    async def sweep(self) -> SweepReport:
        return await sweep_target(
            self.conn, self.server, self.config, self.target, self.audit, dry_run=False
        )

    async def wait_due(self, n: int) -> None:
        """Poll (without acting) until ``n`` sessions are due for a policy."""

        async def due() -> bool:
            snapshot = await take_snapshot(self.conn)
            return len(decide(snapshot, self.config, "main").actions) >= n

        await wait_for(due, timeout=10, what=f"{n} sessions due")

    async def wait_used(self, n: int) -> None:
        async def used() -> bool:
            return (await take_snapshot(self.conn)).used == n

        await wait_for(used, timeout=10, what=f"{n} client sessions")


@contextlib.asynccontextmanager
async def watching(config: Config) -> AsyncIterator[Watch]:
    conn = await connect_target(config.target("main"))
    try:
        yield Watch(config, conn, await server_address(conn))
    finally:
        await conn.close()


def one_event(sentry: SentryEndpoint) -> dict[str, Any]:
    sentry_sdk.flush(timeout=5)
    [event] = sentry.wait_events()
    return event


# -- sweeps that acted -------------------------------------------------------------


async def test_sweep_that_terminated_sends_one_warning_per_policy(
    roles: TempCluster,
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
) -> None:
    config = write_config(tmp_path, roles, sentry)
    alerts = make_alerts(config)
    async with watching(config) as watch, sessions(roles, 3):
        await watch.wait_due(3)
        report = await watch.sweep()
        assert [o.outcome for o in report.outcomes] == ["terminated"] * 3
        alerts.swept(report)
        event = one_event(sentry)

    assert event["message"] == "terminated 3 sessions on main (policy idle)"
    assert event["level"] == "warning"
    assert event["fingerprint"] == ["pg-watchdog", "acted", "main", "idle"]
    assert event["tags"] == {
        "target": "main",
        "policy": "idle",
        "dry_run": "false",
        "action": "terminate",
    }
    context = event["contexts"]["pg_watchdog"]
    assert context["outcomes"] == {"terminated": 3}
    assert context["top_users"] == {"app": 3}
    assert context["top_applications"] == {"victim-0": 1, "victim-1": 1, "victim-2": 1}
    assert "queries" not in context
    assert event["release"] == f"pg-watchdog@{__version__}"
    assert event["environment"] == "test"
    assert event["server_name"] == socket.gethostname()
    assert event["sdk"]["integrations"] == []
    assert not any(MARKER.encode() in body for body in sentry.bodies())


async def test_dry_run_event_says_would_terminate(
    roles: TempCluster,
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
) -> None:
    config = write_config(tmp_path, roles, sentry, dry_run=True)
    alerts = make_alerts(config)
    async with watching(config) as watch, sessions(roles, 2) as victims:
        await watch.wait_due(2)
        report = await watch.sweep()
        alerts.swept(report)
        event = one_event(sentry)
        assert not any(c.is_closed() for c in victims)

    assert event["message"] == "would terminate 2 sessions on main (policy idle, dry run)"
    assert event["tags"]["dry_run"] == "true"
    assert event["contexts"]["pg_watchdog"]["outcomes"] == {"would_terminate": 2}
    assert not any(MARKER.encode() in body for body in sentry.bodies())


@pytest.mark.parametrize("mode", ["full", "truncate", "redact"])
async def test_query_text_never_reaches_sentry_whatever_audit_query_says(
    roles: TempCluster,
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
    mode: str,
) -> None:
    config = write_config(tmp_path, roles, sentry, query=mode, dry_run=True)
    alerts = make_alerts(config)
    async with watching(config) as watch, sessions(roles, 1):
        await watch.wait_due(1)
        report = await watch.sweep()
        alerts.swept(report)
        event = one_event(sentry)

    context = event["contexts"]["pg_watchdog"]
    assert "queries" not in context
    assert context["top_users"] == {"app": 1}  # session details are on by default
    [record] = report.records
    assert record["query"] == ("SELECT $1" if mode == "redact" else f"SELECT '{MARKER}'")
    for body in sentry.bodies():
        assert MARKER.encode() not in body and b"SELECT" not in body, body


async def test_send_session_details_false_leaves_names_and_addresses_out(
    roles: TempCluster,
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
) -> None:
    config = write_config(tmp_path, roles, sentry, connections_above="1%", details=False)
    alerts = make_alerts(config)
    async with watching(config) as watch, sessions(roles, 2, app="victim-secretapp"):
        await watch.wait_due(2)
        alerts.swept(await watch.sweep())
        sentry_sdk.flush(timeout=5)
        events = sentry.wait_events(2)

    acted = next(e for e in events if e["level"] == "warning")
    saturated = next(e for e in events if e["level"] == "error")
    assert acted["message"] == "terminated 2 sessions on main (policy idle)"
    assert acted["contexts"]["pg_watchdog"]["outcomes"] == {"terminated": 2}
    assert saturated["contexts"]["pg_watchdog"]["by_state"]
    for event in (acted, saturated):
        context = event["contexts"]["pg_watchdog"]
        assert not {"top_users", "top_applications", "top_clients"} & context.keys(), context
    for body in sentry.bodies():
        for detail in (b"victim-secretapp", b'"app"'):
            assert detail not in body, (detail, body)


async def test_sweep_without_actions_sends_nothing(
    roles: TempCluster,
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
) -> None:
    config = write_config(tmp_path, roles, sentry)
    alerts = make_alerts(config)
    async with watching(config) as watch, sessions(roles, 1, app="bystander"):
        alerts.swept(await watch.sweep())
    sentry_sdk.flush(timeout=5)
    assert sentry.events() == []


# -- saturation ----------------------------------------------------------------------


async def test_saturation_alerts_once_per_crossing(
    pg: TempCluster,
    make_cluster: Callable[..., TempCluster],
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 10 connections, 3 reserved for superusers: 7 ordinary slots; 4 of them is 57%.
    small = make_cluster(pg.major, max_connections=10)
    small.psql(f"CREATE ROLE app LOGIN; CREATE ROLE dba LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    config = write_config(tmp_path, small, sentry, user="dba", connections_above="50%")
    alerts = make_alerts(config)
    caplog.set_level(logging.INFO, logger="watchdog.alerts")

    def saturation_events() -> list[dict[str, Any]]:
        sentry_sdk.flush(timeout=5)
        return [e for e in sentry.events() if e["fingerprint"][1] == "saturation"]

    async with watching(config) as watch:
        async with sessions(small, 2, app="filler"):  # 3 of 7 with the watchdog's own
            alerts.swept(await watch.sweep())
            assert saturation_events() == []
            async with sessions(small, 1, app="extra"):  # 4 of 7: crosses
                alerts.swept(await watch.sweep())
                [event] = saturation_events()
                alerts.swept(await watch.sweep())  # still above: nothing new
                assert len(saturation_events()) == 1
        await watch.wait_used(1)
        alerts.swept(await watch.sweep())  # below again: re-armed
        async with sessions(small, 3, app="again"):
            alerts.swept(await watch.sweep())
            assert len(saturation_events()) == 2

    assert event["message"] == "main at 57% of connection slots (4/7 ordinary slots)"
    assert event["level"] == "error"
    assert event["fingerprint"] == ["pg-watchdog", "saturation", "main"]
    assert event["tags"] == {"target": "main"}
    context = event["contexts"]["pg_watchdog"]
    assert context["max_connections"] == 10
    assert context["superuser_reserved_connections"] == 3
    assert context["top_applications"]["filler-0"] == 1
    crossings = [r for r in caplog.records if "of connection slots" in r.getMessage()]
    recoveries = [r for r in caplog.records if "connections back to" in r.getMessage()]
    assert [r.levelno for r in crossings] == [logging.WARNING, logging.WARNING]
    assert [r.levelno for r in recoveries] == [logging.INFO]


# -- watchdog trouble --------------------------------------------------------------------


async def test_unreachable_target_is_an_error_event_with_an_error_checkin(
    roles: TempCluster,
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
) -> None:
    config = write_config(tmp_path, roles, sentry)
    alerts = make_alerts(config)
    alerts.checkin("spare", "in_progress")
    with pytest.raises(TargetError) as failed:
        await connect_target(config.target("spare"))
    alerts.trouble("unreachable", str(failed.value), "spare")
    alerts.checkin("spare", "error", 0.01)
    event = one_event(sentry)

    assert event["message"] == str(failed.value)
    assert event["message"].startswith("spare: ")
    assert event["level"] == "error"
    assert event["tags"] == {"kind": "unreachable", "target": "spare"}
    assert event["fingerprint"] == ["pg-watchdog", "unreachable", "spare"]
    started, ended = sentry.wait_checkins(2)
    assert [started["status"], ended["status"]] == ["in_progress", "error"]
    assert started["check_in_id"] == ended["check_in_id"]
    assert started["monitor_slug"] == ended["monitor_slug"] == "pg-watchdog-spare"


async def test_unwritable_audit_log_is_an_error_event(
    roles: TempCluster,
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
) -> None:
    # A path under a regular file cannot be created, even by root.
    (tmp_path / "not-a-dir").write_text("")
    config = write_config(tmp_path, roles, sentry, audit_path=tmp_path / "not-a-dir" / "a.jsonl")
    alerts = make_alerts(config)
    async with watching(config) as watch, sessions(roles, 1) as victims:
        await watch.wait_due(1)
        with pytest.raises(AuditError) as failed:
            await watch.sweep()
        alerts.trouble("audit", str(failed.value), "main")
        event = one_event(sentry)
        assert not victims[0].is_closed()  # fail closed: nothing was signalled

    assert event["message"] == str(failed.value)
    assert "a.jsonl" in event["message"]
    assert event["level"] == "error"
    assert event["tags"] == {"kind": "audit", "target": "main"}
    assert event["fingerprint"] == ["pg-watchdog", "audit", "main"]


async def test_permission_denied_is_one_trouble_event_not_an_action_event(
    roles: TempCluster,
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
) -> None:
    config = write_config(tmp_path, roles, sentry, user="weakdog")
    alerts = make_alerts(config)
    async with watching(config) as watch, sessions(roles, 1):
        await watch.wait_due(1)
        for _ in range(2):
            report = await watch.sweep()
            assert [o.outcome for o in report.outcomes] == ["failed"]
            alerts.swept(report)
        event = one_event(sentry)  # once, and no "terminated 0 sessions" event

    assert event["level"] == "error"
    assert event["tags"] == {"kind": "permission", "target": "main"}
    assert event["fingerprint"] == ["pg-watchdog", "permission", "main"]
    assert event["message"] == (
        "main: cannot signal 1 session (policy idle): "
        "permission denied: the watchdog role needs pg_signal_backend"
    )


def test_rejected_reload_is_an_error_event_without_target(
    tmp_path: Path, sentry: SentryEndpoint, make_alerts: Callable[[Config], Alerts]
) -> None:
    config = write_config(tmp_path, _NO_CLUSTER, sentry)
    alerts = make_alerts(config)
    alerts.trouble("reload", "reload rejected: policies.yaml:14:18: policies[1].longer_than: bad")
    event = one_event(sentry)
    assert event["level"] == "error"
    assert event["tags"] == {"kind": "reload"}
    assert event["fingerprint"] == ["pg-watchdog", "reload"]
    assert event["message"].startswith("reload rejected: ")


def test_secrets_are_scrubbed_from_message_tags_extra_and_contexts(
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = write_config(tmp_path, _NO_CLUSTER, sentry)
    alerts = make_alerts(config)
    leak = f"postgresql://watchdog:{quote(PASSWORD, safe='')}@db/x pw={PASSWORD} file={FILE_SECRET}"
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("leak", PASSWORD)
        scope.set_extra("leak", leak)
        scope.set_context("leak", {"dsn": leak, "nested": [FILE_SECRET]})
        alerts.trouble("unreachable", leak, "main")
    event = one_event(sentry)
    assert event["message"] == "postgresql://watchdog:***@db/x pw=*** file=***"
    assert event["tags"]["leak"] == "***"
    assert event["extra"]["leak"] == event["message"]
    assert event["contexts"]["leak"] == {"dsn": event["message"], "nested": ["***"]}
    assert event["message"] in caplog.text
    assert not any(secret in caplog.text for secret in SECRETS)


# -- check-ins ----------------------------------------------------------------------------


async def test_checkins_pair_in_progress_with_ok_once_per_interval_and_errors_at_once(
    roles: TempCluster,
    tmp_path: Path,
    sentry: SentryEndpoint,
    make_alerts: Callable[[Config], Alerts],
) -> None:
    config = write_config(tmp_path, roles, sentry)  # main is swept every 30 s
    alerts = make_alerts(config)
    async with watching(config) as watch:
        for _ in range(3):  # sweeps come much faster than that near thresholds
            alerts.checkin("main", "in_progress")
            report = await watch.sweep()
            alerts.checkin("main", "ok", report.duration)
    alerts.checkin("main", "error", 0.01)  # a failure is news: it goes out at once
    alerts.checkin("main", "in_progress")
    alerts.checkin("main", "error", 0.01)  # but once per interval
    alerts.close()  # flushes: whatever was handed over has arrived
    checkins = sentry.checkins()

    assert [c["status"] for c in checkins] == ["in_progress", "ok", "error"]
    assert {c["monitor_slug"] for c in checkins} == {"pg-watchdog-main"}
    assert checkins[0]["check_in_id"] == checkins[1]["check_in_id"]
    assert checkins[2]["check_in_id"] != checkins[0]["check_in_id"]
    assert checkins[0]["duration"] is None
    assert 0 < checkins[1]["duration"] < 5
    assert checkins[1]["monitor_config"]["schedule"] == {
        "type": "interval",
        "value": 1,
        "unit": "minute",
    }
    assert checkins[1]["monitor_config"]["checkin_margin"] >= 1
    assert checkins[1]["environment"] == "test"


def test_monitor_schedule_follows_the_target_interval(
    tmp_path: Path, sentry: SentryEndpoint, make_alerts: Callable[[Config], Alerts]
) -> None:
    alerts = make_alerts(write_config(tmp_path, _NO_CLUSTER, sentry))
    alerts.checkin("spare", "ok", 0.5)  # no in_progress before it: a check-in of its own
    [checkin] = sentry.wait_checkins()
    assert checkin["monitor_config"]["schedule"] == {
        "type": "interval",
        "value": 5,
        "unit": "minute",
    }
    assert checkin["status"] == "ok"
    assert checkin["duration"] == 0.5


def test_monitor_slug_is_slugified() -> None:
    assert monitor_slug("main") == "pg-watchdog-main"
    assert monitor_slug("Main.DB_1") == "pg-watchdog-main-db_1"
    assert len(monitor_slug("x" * 80)) == 50


# -- configuration --------------------------------------------------------------------------


def test_without_a_dsn_sentry_stays_off_and_trouble_is_logged(
    tmp_path: Path,
    make_alerts: Callable[[Config], Alerts],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SENTRY_DSN", "http://publickey@127.0.0.1:9/1")  # must not be picked up
    alerts = make_alerts(write_config(tmp_path, _NO_CLUSTER, None))
    alerts.checkin("main", "in_progress")
    alerts.trouble("reload", "reload rejected: bad file")
    assert not alerts.enabled
    assert not sentry_sdk.get_client().is_active()
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR] == [
        (logging.ERROR, "reload rejected: bad file")
    ]


def test_reload_restarts_sentry_only_when_its_settings_change(
    tmp_path: Path, sentry: SentryEndpoint, make_alerts: Callable[[Config], Alerts]
) -> None:
    alerts = make_alerts(write_config(tmp_path, _NO_CLUSTER, sentry))
    client = sentry_sdk.get_client()
    alerts.configure(write_config(tmp_path, _NO_CLUSTER, sentry))
    assert sentry_sdk.get_client() is client
    alerts.configure(write_config(tmp_path, _NO_CLUSTER, sentry, environment="staging"))
    assert sentry_sdk.get_client() is not client
    assert client.transport is None  # the old one was flushed and closed
    alerts.trouble("reload", "reload rejected: bad file")
    assert one_event(sentry)["environment"] == "staging"
    alerts.configure(write_config(tmp_path, _NO_CLUSTER, None))
    assert not alerts.enabled and not sentry_sdk.get_client().is_active()


class _NoCluster:
    """Stands in for a cluster in configs of tests that never connect."""

    port = 9


_NO_CLUSTER: Any = _NoCluster()
