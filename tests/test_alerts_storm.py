"""Alerts that arrive: the real `pg-watchdog run` and sentry-sdk against a Sentry that answers
slowly, through a storm of sweeps that act; and `once`, which alerts as a sweep of `run` does.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from daemon import Daemon, audit_records, write_config
from helpers import connect, free_port, wait_for
from scenario import APP_ROLE, run_cli, setup_roles
from sentry_endpoint import SentryEndpoint

from watchdog.commands.demo.tempcluster import TempCluster

STORM = 20.0  # seconds of victims
ARRIVAL = 0.3  # a new idle session of role app this often
DELAY = 0.4  # each request to the endpoint is answered this late, as a distant Sentry does
ACTED = re.compile(r"^terminated (\d+) sessions? on main \(policy idle\)")


def sentry_section(sentry: SentryEndpoint) -> str:
    return f"alerts:\n  sentry:\n    dsn: {sentry.dsn}\n    environment: test\n"


def checkins_sent(sentry: SentryEndpoint, since: datetime, until: datetime) -> list[Any]:
    """The main target's check-ins that the SDK captured (sent_at) within [since, until]."""
    return [
        item.json()
        for e in list(sentry.envelopes)
        for item in e.items
        if item.type == "check_in"
        and item.json()["monitor_slug"] == "pg-watchdog-main"
        and since <= datetime.fromisoformat(e.headers["sent_at"]) <= until
    ]


def acted_total(sentry: SentryEndpoint) -> tuple[int, int]:
    """(events saying the main target's idle policy terminated sessions, their sessions)."""
    counts = [int(m[1]) for e in sentry.events() if (m := ACTED.match(e.get("message", "")))]
    return len(counts), sum(counts)


@pytest.mark.timeout(420)  # a 20 s storm, then up to two minutes for a slow Sentry to drain
async def test_storm_of_acting_sweeps_paces_checkins_and_every_acted_event_arrives(
    pg: TempCluster, tmp_path: Path
) -> None:
    setup_roles(pg)
    audit = tmp_path / "audit.jsonl"
    victims: list[asyncpg.Connection] = []
    with SentryEndpoint(delay=DELAY) as sentry:
        config = write_config(
            tmp_path / "p.yaml", pg, idle="1s", interval="1s", audit=audit,
            extra=sentry_section(sentry),
        )
        started = time.monotonic()
        with Daemon(config) as daemon:
            try:
                # Sweeps run and Sentry hears them before the storm begins.
                sentry.wait_for(lambda: sentry.checkins(), timeout=60)
                storm_began = datetime.now(UTC)
                end = time.monotonic() + STORM
                i = 0
                while time.monotonic() < end:
                    victims.append(await connect(pg, APP_ROLE, f"storm-{i}"))
                    i += 1
                    await asyncio.sleep(ARRIVAL)
                storm_ended = datetime.now(UTC)

                def terminated() -> list[dict[str, Any]]:
                    return [r for r in audit_records(audit) if r["outcome"] == "terminated"]

                async def all_acted() -> bool:
                    return bool(victims) and len(terminated()) == len(victims)

                await wait_for(all_acted, timeout=60, what="every victim terminated")
                kills = terminated()
                sweeps = {r["sweep"] for r in kills}

                async def arrived() -> bool:
                    return acted_total(sentry) == (len(sweeps), len(kills))

                try:
                    await wait_for(arrived, timeout=120, interval=0.5, what="every acted event")
                except AssertionError:
                    pytest.fail(
                        f"{acted_total(sentry)} (events, sessions) arrived for "
                        f"{(len(sweeps), len(kills))} acting sweeps and kills; "
                        f"{len(sentry.checkins())} check-ins",
                        pytrace=False,
                    )
                assert daemon.stop() == 0, daemon.log()
            finally:
                for conn in victims:
                    conn.terminate()
        lifetime = time.monotonic() - started
        # A storm of acting sweeps (near the 250 ms floor: about one per victim), all audited.
        assert len(kills) == len(victims) >= 20
        assert len(sweeps) >= 10, (len(sweeps), len(kills))
        assert {r["outcome"] for r in audit_records(audit)} == {"terminated"}
        # One check-in per interval (1 s), however often it swept. Those captured during the
        # storm all came before its last acted event in the SDK's queue, so all arrived.
        during = checkins_sent(sentry, storm_began, storm_ended)
        storm = (storm_ended - storm_began).total_seconds()
        assert 2 <= len(during) <= math.ceil(storm / 1.0) + 1, (len(during), storm, len(sweeps))
        checkins = [c for c in sentry.checkins() if c["monitor_slug"] == "pg-watchdog-main"]
        assert len(checkins) <= math.ceil(lifetime / 1.0) + 1, (len(checkins), lifetime)
        assert {c["status"] for c in checkins} == {"ok"}
        assert not sentry.errors


ONCE_POLICY = """
targets:
  - name: main
    dsn: {dsn}
  - name: away
    dsn: postgresql://watchdog@127.0.0.1:{port}/postgres
exclude:
  superusers: true
policies:
  - name: idle
    state: idle
    longer_than: 1s
    users: [app]
audit:
  path: {audit}
{sentry}
"""


async def run_once_cli(config: Path) -> tuple[int, str]:
    res = await run_cli("once", "-c", config, timeout=120)
    return res.rc, res.stderr


async def test_once_alerts_and_checks_in_per_target_and_flushes_before_exit(
    pg: TempCluster, tmp_path: Path
) -> None:
    setup_roles(pg)
    with SentryEndpoint(delay=DELAY) as sentry:
        config = tmp_path / "p.yaml"
        config.write_text(ONCE_POLICY.format(
            dsn=pg.dsn("watchdog"), port=free_port(), audit=tmp_path / "audit.jsonl",
            sentry=sentry_section(sentry),
        ))
        victims = [await connect(pg, APP_ROLE, f"cron-{i}") for i in range(3)]
        try:
            await wait_for(
                lambda: pg.psql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'cron-%'"
                    " AND now() - state_change > interval '1.2 s'"
                ) == "3",
                what="the victims idle past 1s",
            )
            code, err = await run_once_cli(config)
        finally:
            for conn in victims:
                conn.terminate()
        assert code == 1  # the unreachable target
        [line] = err.splitlines()  # one line for it, as before
        assert line.startswith("pg-watchdog: away:"), err
        # Read at once, without waiting: `once` flushed before it exited.
        events = sentry.events()
        messages = sorted(e["message"] for e in events)
        assert len(messages) == 2, messages
        assert messages[1].startswith("terminated 3 sessions on main (policy idle)"), messages
        trouble = next(e for e in events if e["tags"].get("kind") == "unreachable")
        assert trouble["tags"]["target"] == "away" and trouble["level"] == "error"
        checkins = {c["monitor_slug"]: c["status"] for c in sentry.checkins()}
        assert len(sentry.checkins()) == 2
        assert checkins == {"pg-watchdog-main": "ok", "pg-watchdog-away": "error"}


async def test_once_with_an_unwritable_audit_log_is_an_audit_event(
    pg: TempCluster, tmp_path: Path
) -> None:
    setup_roles(pg)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with SentryEndpoint() as sentry:
        config = tmp_path / "p.yaml"
        config.write_text(ONCE_POLICY.format(
            dsn=pg.dsn("watchdog"), port=free_port(), audit=blocker / "audit.jsonl",
            sentry=sentry_section(sentry),
        ))
        code, err = await run_once_cli(config)
        assert code == 1
        assert len(err.splitlines()) == 1, err
        [event] = sentry.events()
        assert event["tags"]["kind"] == "audit" and event["level"] == "error"
        assert "nothing was signalled" in event["message"]
        statuses = {c["monitor_slug"]: c["status"] for c in sentry.checkins()}
        assert statuses == {"pg-watchdog-main": "error", "pg-watchdog-away": "error"}
