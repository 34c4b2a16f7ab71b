"""A target that stays down is one outage: one message, one Sentry event, however many
reconnect attempts and sweeps in between (real `pg-watchdog run`, real sentry-sdk into a
local endpoint, a stopped server); when it is back, the next outage alerts again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import MAJORS, MakeCluster
from daemon import Daemon
from helpers import wait_for
from reloading import killed, leader, policy
from scenario import setup_roles
from sentry_endpoint import SentryEndpoint


def _unreachable(sentry: SentryEndpoint) -> list[dict[str, Any]]:
    return [e for e in sentry.events() if e.get("tags", {}).get("kind") == "unreachable"]


@pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
async def test_a_stopped_server_is_one_event_per_outage(
    major: int, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    c = make_cluster(major)
    setup_roles(c)
    with SentryEndpoint() as sentry:
        alerts = f"alerts: {{sentry: {{dsn: '{sentry.dsn}', environment: test}}}}"
        cfg = policy(tmp_path / "p.yaml", c, interval="250ms", extra=alerts)
        with Daemon(cfg) as d:
            await leader(c)
            for outage in (1, 2):
                c.stop()
                attempts = d.log().count("next attempt in")
                # Several failed connection attempts, with sweeps in their backoff between.
                await wait_for(
                    lambda: d.log().count("next attempt in") >= attempts + 3,  # noqa: B023
                    timeout=60,
                    what="three reconnect attempts",
                )
                await asyncio.to_thread(sentry.wait_for, lambda: len(_unreachable(sentry)), 10)
                c.start()
                await killed(c, tmp_path / "audit.jsonl")  # recovered
                events = _unreachable(sentry)
                assert len(events) == outage, [e["message"] for e in events]
            assert d.stop() == 0
    messages = [e["message"] for e in events]
    assert all(m.startswith("main: ") and "main: main:" not in m for m in messages), messages
    assert "main: main:" not in d.log()
    assert d.log().count("main: recovered (unreachable)") == 2
