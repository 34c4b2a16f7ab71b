"""Stale prepared transactions, on real servers with max_prepared_transactions > 0: `status`
shows them, `advise` prints the ROLLBACK PREPARED to review (and it works as printed), `run`
sends one Sentry event per transaction past alerts.prepared_older_than, and nothing in
pg-watchdog ever commits or rolls one back.

One gid is hostile (a quote, a backslash, a newline), one transaction sits in a database whose
name needs quoting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import connect, wait_for
from scenario import policy_file, run_cli, setup_roles, start_service, stop_process
from sentry_endpoint import SentryEndpoint

from watchdog.commands.demo.tempcluster import TempCluster

MakeCluster = Callable[..., TempCluster]
ODD = "it's \\ odd\nline"
PLAIN = "order-42"
DATABASE = "Orders DB"


def cluster(pg: TempCluster, make_cluster: MakeCluster) -> TempCluster:
    server = make_cluster(pg.major, settings={"max_prepared_transactions": "4"})
    setup_roles(server)
    server.psql(f'CREATE DATABASE "{DATABASE}"; GRANT CREATE ON SCHEMA public TO app;')
    server.psql("GRANT CREATE ON SCHEMA public TO app", database=DATABASE)
    return server


async def prepare(server: TempCluster, gid: str, user: str = "app",
                  database: str = "postgres") -> None:
    """A prepared transaction that holds a lock on a table of its own."""
    conn = await connect(server, user, "two-phase-app", database=database)
    try:
        literal = await conn.fetchval("SELECT quote_literal($1)", gid)
        table = await conn.fetchval("SELECT quote_ident($1)", f"t {gid}")
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int)")
        await conn.execute("BEGIN")
        await conn.execute(f"LOCK TABLE {table} IN SHARE MODE")
        await conn.execute(f"PREPARE TRANSACTION {literal}")
    finally:
        await conn.close()


async def gids(server: TempCluster) -> set[str]:
    conn = await connect(server)
    try:
        return {r["gid"] for r in await conn.fetch("SELECT gid FROM pg_prepared_xacts")}
    finally:
        await conn.close()


def config_for(tmp_path: Path, server: TempCluster, sentry: SentryEndpoint | None = None,
               interval: str = "30s") -> Path:
    alerts: dict[str, Any] = {"sentry": {"dsn": sentry.dsn if sentry else "",
                                         "environment": "test"},
                              "prepared_older_than": "1s"}
    return policy_file(tmp_path, server, interval=interval, extra={"alerts": alerts})


async def test_status_and_advise_show_stale_prepared_transactions_and_the_rollback_works(
    pg: TempCluster, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    server = cluster(pg, make_cluster)
    await prepare(server, ODD, database=DATABASE)
    await prepare(server, PLAIN, user="postgres")
    config = config_for(tmp_path, server)
    await asyncio.sleep(1.2)  # past prepared_older_than

    res = await run_cli("status", "-c", config, "--json")
    assert res.rc == 0, res.stderr
    shown = {x["gid"]: x for x in res.json()["targets"][0]["prepared_transactions"]}
    assert set(shown) == {ODD, PLAIN}
    assert shown[ODD]["database"] == DATABASE and shown[ODD]["owner"] == "app"
    assert all(x["stale"] and x["age_s"] >= 1 for x in shown.values())
    text = await run_cli("status", "-c", config)
    assert "prepared     2 prepared transactions, 2 older than" in text.stdout, text.stdout
    assert ODD not in text.stdout and "\\nline" in text.stdout  # escaped, one line each

    res = await run_cli("advise", "-c", config, "--json")
    assert res.rc == 0, res.stderr
    found = {f["subject"]: f for f in res.json()["findings"] if f["id"] == "stale_prepared"}
    odd_literal = "E'it''s \\\\ odd\nline'"
    assert set(found) == {f"prepared transaction {odd_literal}", f"prepared transaction '{PLAIN}'"}
    odd = found[f"prepared transaction {odd_literal}"]
    assert odd["severity"] == "high"
    assert any(f'connected to database "{DATABASE}" as app' in x for x in odd["fix"]), odd
    [statement] = [x.strip() for x in odd["fix"] if x.strip().startswith("ROLLBACK PREPARED")]
    assert statement == "ROLLBACK PREPARED E'it''s \\\\ odd\nline';", statement
    assert await gids(server) == {ODD, PLAIN}, "advise must never finish one itself"

    conn = await connect(server, "app", database=DATABASE)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
    assert await gids(server) == {PLAIN}
    res = await run_cli("advise", "-c", config, "--json")
    assert [f["subject"] for f in res.json()["findings"] if f["id"] == "stale_prepared"] == [
        f"prepared transaction '{PLAIN}'"
    ]


async def test_run_alerts_once_per_stale_prepared_transaction_and_never_finishes_one(
    pg: TempCluster, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    server = cluster(pg, make_cluster)
    await prepare(server, ODD, database=DATABASE)
    with SentryEndpoint() as sentry:
        config = config_for(tmp_path, server, sentry, interval="1s")
        proc = await start_service(config, tmp_path / "run.log")
        try:
            def prepared_events() -> list[dict[str, Any]]:
                return [e for e in sentry.events()
                        if e.get("tags", {}).get("kind") == "prepared_transaction"]

            await wait_for(lambda: len(prepared_events()) == 1, 30, what="the first event")
            # A second transaction, alerted later, proves the service read them again since:
            # the read that alerts it lists the first one too (first, oldest first), so a
            # repeated event for the first would have been sent before it.
            await prepare(server, PLAIN, user="postgres")
            await wait_for(lambda: len(prepared_events()) >= 2, 30, what="the second event")
            events = prepared_events()
        finally:
            assert await stop_process(proc) == 0
    assert len(events) == 2, events
    first, second = events
    assert first["level"] == "warning" and first["tags"]["target"] == "main"
    assert first["message"].startswith(f"prepared transaction {ODD!r} on main is "), first
    assert first["fingerprint"] == ["pg-watchdog", "prepared", "main", ODD]
    assert first["contexts"]["pg_watchdog"]["gid"] == ODD
    assert first["contexts"]["pg_watchdog"]["database"] == DATABASE
    assert "ROLLBACK PREPARED" in first["contexts"]["pg_watchdog"]["review"]
    assert second["contexts"]["pg_watchdog"]["gid"] == PLAIN
    assert await gids(server) == {ODD, PLAIN}, "the watchdog never finishes a prepared xact"
    log = (tmp_path / "run.log").read_text()
    assert ODD not in log and f"prepared transaction {ODD!r} on main" in log  # escaped
