"""Secrets in query text, end to end: with default settings no password or card number that a
killed session's last statement held reaches any record or output.

Sessions change a password and send a card number (as a number and as a string), sit idle and
are killed by `pg-watchdog once --json` and by the `run` service, with Sentry on (the real
sentry-sdk posting to tests/sentry_endpoint.py). Every byte of stdout, stderr, the service's
log, the audit log, the intent journals and the Sentry envelopes is searched for the secrets,
and each record still names the statement's shape.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from helpers import connect, wait_for
from scenario import BIN, WATCHDOG_ROLE, cli_env, kill_leftovers, read_audit, run_cli, setup_roles
from sentry_endpoint import SentryEndpoint

from watchdog.audit.log import AuditError, AuditLog
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import load_config
from watchdog.pg.connect import connect as connect_target
from watchdog.pg.connect import server_address
from watchdog.service.sweep import sweep_target

PASSWORD = "Sup3rS3cret!"
CARD = "4111111111111111"
SECRETS = (PASSWORD, CARD, "Sup3rS3cret")
STATEMENTS = {
    # what the session ran: the shape its record must show
    f"ALTER ROLE app PASSWORD '{PASSWORD}'": "ALTER ROLE app PASSWORD $1",
    f"SELECT {CARD} AS pan, '{CARD}' AS pan_text": "SELECT $1 AS pan, $2 AS pan_text",
}


def assert_no_secret(what: str, data: str | bytes) -> None:
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    for secret in SECRETS:
        assert secret.encode() not in raw, f"{what} shows {secret!r}:\n{data!r}"


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    return pg


@pytest.fixture
def sentry() -> Iterator[SentryEndpoint]:
    with SentryEndpoint() as endpoint:
        yield endpoint
        for body in endpoint.bodies():
            assert_no_secret("a Sentry envelope", body)


def write_config(tmp_path: Path, cluster: TempCluster, sentry: SentryEndpoint | None,
                 interval: str = "30s") -> Path:
    """Default settings (no audit.query: redact), short thresholds, Sentry on."""
    doc: dict[str, Any] = {
        "targets": [{"name": "main", "dsn": cluster.dsn(WATCHDOG_ROLE), "interval": interval}],
        "policies": [{"name": "idle", "state": "idle", "longer_than": "500ms",
                      "users": ["app"]}],
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }
    if sentry is not None:
        doc["alerts"] = {"sentry": {"dsn": sentry.dsn, "environment": "test"}}
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
async def victims(cluster: TempCluster) -> AsyncIterator[dict[int, str]]:
    """pid -> the statement each idle session of role app ran last."""
    kill_leftovers(cluster)
    conns: list[asyncpg.Connection] = []
    try:
        for sql in STATEMENTS:
            conns.append(await connect(cluster, "app", "payments"))
            await conns[-1].execute(sql)
            cluster.reset_passwords("app")  # ALTER ROLE app PASSWORD: later logins need ours
        admin = await connect(cluster, "postgres", "psql")
        try:
            pids = [c.get_server_pid() for c in conns]
            rows = await admin.fetch(
                "SELECT pid, query FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids)
        finally:
            await admin.close()
        shown = {r["pid"]: r["query"] for r in rows}
        assert set(shown.values()) == set(STATEMENTS)  # the server shows the secrets
        yield shown
    finally:
        for c in conns:
            c.terminate()


def check_records(records: list[dict[str, Any]], victims: dict[int, str],
                  outcome: str = "terminated") -> None:
    by_pid = {r["pid"]: r for r in records if r["outcome"] == outcome}
    assert set(by_pid) == set(victims), records
    for pid, sql in victims.items():
        assert by_pid[pid]["query"] == STATEMENTS[sql]


async def test_once_json_audit_log_and_sentry_hold_no_secret(
    cluster: TempCluster, victims: dict[int, str], sentry: SentryEndpoint, tmp_path: Path
) -> None:
    await asyncio.sleep(0.7)
    config = write_config(tmp_path, cluster, sentry)
    once = await run_cli("-v", "once", "--json", "-c", config)
    assert once.rc == 0, once.stderr
    assert_no_secret("`once --json` stdout", once.stdout)
    assert_no_secret("`once` stderr", once.stderr)
    [target] = once.json()["targets"]
    check_records(target["records"], victims)
    audit = tmp_path / "audit.jsonl"
    assert_no_secret("the audit log", audit.read_bytes())
    check_records(read_audit(audit), victims)
    [event] = sentry.wait_events(1)
    assert event["message"] == "terminated 2 sessions on main (policy idle)"


async def test_run_service_log_audit_log_and_sentry_hold_no_secret(
    cluster: TempCluster, victims: dict[int, str], sentry: SentryEndpoint, tmp_path: Path
) -> None:
    config = write_config(tmp_path, cluster, sentry, interval="250ms")
    audit, log = tmp_path / "audit.jsonl", tmp_path / "run.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            str(BIN), "-v", "run", "-c", str(config), env=cli_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        await wait_for(lambda: len(read_audit(audit)) >= len(victims), timeout=30,
                       what="the service to kill both sessions")
        await wait_for(lambda: len(sentry.events()) >= 1, timeout=15, what="the alert")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text(errors="replace")
    text = log.read_bytes()
    assert b"terminated pid" in text
    assert_no_secret("the `run` log", text)
    assert_no_secret("the audit log", audit.read_bytes())
    check_records(read_audit(audit), victims)


async def test_intent_journals_hold_no_secret(
    cluster: TempCluster, victims: dict[int, str], tmp_path: Path
) -> None:
    # The audit path is a directory: the intents reach the journal, the signals go out,
    # the final records cannot be written and stay in the journal for recovery.
    await asyncio.sleep(0.7)
    path = write_config(tmp_path, cluster, None)
    config = load_config(str(path))
    audit_path = config.audit.path
    audit_path.mkdir()
    audit = AuditLog(audit_path)
    conn = await connect_target(config.target("main"))
    try:
        with pytest.raises(AuditError):
            await sweep_target(conn, await server_address(conn), config, config.target("main"),
                               audit, dry_run=False)
    finally:
        await conn.close()
        audit.close()  # unsettled: the journal stays for the next process to settle
    [journal] = list((tmp_path / "audit.jsonl.intents").iterdir())
    raw = journal.read_bytes()
    assert_no_secret("an intent journal", raw)
    intents = [json.loads(line) for line in raw.splitlines()]
    check_records(intents, victims, outcome="intent")

    audit_path.rmdir()
    once = await run_cli("once", "-c", path)
    assert once.rc == 0, once.stderr
    assert_no_secret("the audit log after recovery", audit_path.read_bytes())
    check_records(read_audit(audit_path), victims, outcome="unconfirmed")
