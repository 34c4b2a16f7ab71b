"""Signals that went out before the server went silent still reach alerts and metrics.

A proxy forwards the signalling statement to the real server (the victims die) and then
answers nothing, as a network that dies without a word: the sweep's own timeout gives up,
the records say `unconfirmed`, and the service reports those actions to Sentry (real
sentry-sdk, local endpoint) and to its metrics as any sweep's, besides the trouble alert.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from daemon import Daemon, write_config
from faults import CutProxy, alive, by_pid, close_all, open_victims, pids_of, read_records
from helpers import free_port, wait_for
from sentry_endpoint import SentryEndpoint
from test_audit_stall import _metric

from watchdog.commands.demo.tempcluster import TempCluster


@pytest.fixture
def sentry() -> Iterator[SentryEndpoint]:
    with SentryEndpoint() as endpoint:
        yield endpoint


async def test_signals_before_a_silent_network_are_reported(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path, sentry: SentryEndpoint
) -> None:
    port = free_port()
    audit = tmp_path / "audit.jsonl"
    victims = await open_victims(pg, 3)
    pids = pids_of(victims)
    await asyncio.sleep(1.1)
    extra = f"alerts:\n  sentry:\n    dsn: {sentry.dsn}\nmetrics:\n  listen: 127.0.0.1:{port}\n"
    async with CutProxy(pg.host, pg.port, b"pg_terminate_backend(", silent=True) as proxy:
        cfg = write_config(tmp_path / "p.yaml", pg, idle="1s", interval="250ms", extra=extra)
        cfg.write_text(cfg.read_text().replace(f":{pg.port}/", f":{proxy.port}/"))
        with Daemon(cfg) as d:
            await asyncio.wait_for(proxy.cut.wait(), 30)

            async def dead() -> bool:
                return not await alive(pg, pids)

            await wait_for(dead, timeout=15, what="the victims to die")  # the server ran it
            # The sweep's timeout gives up on the silent connection: its actions are on
            # record as unconfirmed, and counted and alerted as any sweep's.
            await wait_for(lambda: set(pids) <= set(by_pid(read_records(audit))), timeout=30,
                           what="the victims' records")
            await wait_for(
                lambda: _metric(port, "pg_watchdog_actions_total", outcome="unconfirmed") == 3,
                timeout=30, what="3 unconfirmed actions in the metrics")
            sentry.wait_for(
                lambda: [e for e in sentry.events() if "3 unconfirmed" in str(e.get("message"))],
                timeout=30)
            sentry.wait_for(
                lambda: [e for e in sentry.events()
                         if e.get("tags", {}).get("kind") == "unreachable"], timeout=30)
            assert d.stop() == 0
    close_all(victims)
    outcomes = by_pid(read_records(audit))
    assert all(outcomes[p] == ["unconfirmed"] for p in pids), outcomes
