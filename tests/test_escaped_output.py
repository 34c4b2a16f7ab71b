"""Names from the server never forge a log line or hide in JSON: one record a line, escaped.

Real roles and a real database on a real server carry a newline followed by a fake log line,
C1 controls (U+0085 NEL, U+009B CSI), line and paragraph separators and bidi controls (the
server keeps role and database names as written). Their sessions are killed by `pg-watchdog
run` (its stderr must stay one record a line) and by `once --json`; the audit log, `once
--json`, `status --json` and `audit --json` must hold none of those characters raw, and
still give back the exact names when parsed.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from daemon import Daemon
from helpers import connect, wait_for
from scenario import WATCHDOG_ROLE, read_audit, run_cli, setup_roles

from watchdog.audit.journal import encode, parse
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.text.escape import json_line, log_text

FORGED = "INFO watchdog.sweep: main: forged"
ROLES = {
    # name: quoted identifier
    f"x\n{FORGED}": f'"x\n{FORGED}"',
    "r\x9b[2J\u2028\u202eevil\u2066": '"r\x9b[2J\u2028\u202eevil\u2066"',
}
DATABASE = "db\u2029\x85\u061c\u200f"
RAW = ("\n", "\x85", "\x9b", "\u2028", "\u2029", "\u202e", "\u2066", "\u061c", "\u200f")
LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: "
)


def assert_no_raw(what: str, text: str, allow_newlines: bool = True) -> None:
    for ch in RAW[1:] if allow_newlines else RAW:
        assert ch not in text, f"{what} holds {ch!r} raw:\n{text!r}"


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    sql = [f"CREATE ROLE {quoted} LOGIN;" for quoted in ROLES.values()]
    sql.append(f'CREATE DATABASE "{DATABASE}";')
    pg.psql("\n".join(sql))
    return pg


@pytest.fixture
async def sessions(cluster: TempCluster) -> AsyncIterator[dict[int, str]]:
    """pid -> role of an idle session of each hostile role, in the hostile database."""
    conns: list[asyncpg.Connection] = []
    try:
        for role in ROLES:
            conns.append(await connect(cluster, role, "forge-1", database=DATABASE))
            await conns[-1].execute("SELECT 1")
        yield {c.get_server_pid(): role for c, role in zip(conns, ROLES, strict=True)}
    finally:
        for c in conns:
            c.terminate()


def write_config(tmp_path: Path, cluster: TempCluster, interval: str = "30s") -> Path:
    doc: dict[str, Any] = {
        "targets": [{"name": "main", "dsn": cluster.dsn(WATCHDOG_ROLE), "interval": interval}],
        "policies": [{"name": "idle", "state": "idle", "longer_than": "300ms",
                      "applications": ["forge-*"]}],
        "audit": {"path": str(tmp_path / "audit.jsonl")},
    }
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def check_names(records: list[dict[str, Any]], sessions: dict[int, str]) -> None:
    """Lossless: the exact names come back from the JSON."""
    assert {r["pid"]: r["usename"] for r in records} == sessions
    assert {r["datname"] for r in records} == {DATABASE}


async def test_run_log_keeps_one_record_a_line(
    cluster: TempCluster, sessions: dict[int, str], tmp_path: Path
) -> None:
    config = write_config(tmp_path, cluster, interval="250ms")
    audit = tmp_path / "audit.jsonl"
    with Daemon(config) as daemon:
        await wait_for(lambda: len(read_audit(audit)) >= len(sessions), timeout=30,
                       what="the service to kill the sessions")
        assert daemon.stop() == 0
        log = daemon.log()
    assert "terminated pid" in log
    lines = log.splitlines()
    assert all(LOG_LINE.match(line) for line in lines), lines
    assert not any(line.startswith(FORGED) for line in lines)
    assert_no_raw("the `run` log", log)
    assert f"x\\n{FORGED}" in log  # the name, escaped, on its record's line
    check_names(read_audit(audit), sessions)


async def test_json_outputs_escape_controls_and_stay_lossless(
    cluster: TempCluster, sessions: dict[int, str], tmp_path: Path
) -> None:
    config = write_config(tmp_path, cluster)
    status = await run_cli("status", "--json", "--explain", "-c", config)
    assert status.rc == 0, status.stderr
    assert_no_raw("`status --json`", status.stdout.rstrip("\n"), allow_newlines=False)
    users = {s["user"] for t in status.json()["targets"] for s in t["explain"]}
    assert set(ROLES) <= users

    await asyncio.sleep(0.4)
    once = await run_cli("once", "--json", "-c", config)
    assert once.rc == 0, once.stderr
    assert_no_raw("`once --json`", once.stdout)
    [target] = once.json()["targets"]
    check_names(target["records"], sessions)

    audit = tmp_path / "audit.jsonl"
    text = audit.read_text(encoding="utf-8")
    assert_no_raw("the audit log", text)
    assert text.count("\n") == len(sessions)
    check_names(read_audit(audit), sessions)

    review = await run_cli("audit", "--json", "--file", audit)
    assert review.rc == 0, review.stderr
    assert_no_raw("`audit --json`", review.stdout)
    check_names([json.loads(line) for line in review.stdout.splitlines()], sessions)


VALUES = ["plain", "x\nINFO forged", "\x00\x1b[31m\x7f\x85\x9b", "\u2028\u2029",
          "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
          "lone \ud800 surrogate", "é😀 日本"]


@pytest.mark.parametrize("value", VALUES)
def test_json_writers_escape_and_round_trip(value: str) -> None:
    record = {"usename": value, value: [value]}
    for text in (json_line(record), encode([record]).decode("utf-8")):
        assert_no_raw("JSON", text.rstrip("\n"), allow_newlines=False)
        assert not re.search("[\x00-\x1f\x7f-\x9f\ud800-\udfff]", text.rstrip("\n"))
        assert json.loads(text) == record
    assert parse(encode([record]).rstrip(b"\n")) == record


@pytest.mark.parametrize("value", VALUES)
def test_log_text_is_one_line(value: str) -> None:
    shown = log_text(f"user {value} done")
    assert len(shown.splitlines()) == 1
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]", shown)
