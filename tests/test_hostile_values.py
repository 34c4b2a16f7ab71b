"""Hostile session values end to end: quotes, newlines, tabs, terminal escapes, unicode,
63-byte names and megabyte queries, from a real server through `pg-watchdog once` into
the audit log and back out of `pg-watchdog audit`.

The audit log must keep the exact values pg_stat_activity showed (one valid JSON object
per line, no raw newline inside one); the tables printed for people must never write a
raw escape or newline, and must have one row per action.

Note: the server itself cleans application_name (non-ASCII and control characters become
`?` on PostgreSQL 15 and `\\xNN` on 16+), so the raw hostile characters reach the watchdog
through role names, database names and query texts, which the server keeps as they are.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from helpers import wait_for
from scenario import WATCHDOG_ROLE, run_cli, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster

# Quoted identifiers (SQL syntax: a doubled " inside) of the hostile roles and databases.
HOSTILE_ROLES = {
    "we'ird \"user\"": '"we\'ird ""user"""',
    "ユーザー😀": '"ユーザー😀"',
    "evil\n\x1b[31m\u202euser\t": '"evil\n\x1b[31m\u202euser\t"',
}
HOSTILE_DBS = {"my data base": '"my data base"', "données ☃\ttab": '"données ☃\ttab"'}
HOSTILE_QUERY = (
    "SELECT 'it''s \"quoted\"', 'line1\nline2\r\n\ttabbed', E'\\x1b[31mred\\x1b[0m',"
    " '\x1b[2J😀 日本語 \u202eevil \u2028sep \x85nel' /* done */"
)
ESC = "\x1b"
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    sql = [f"CREATE ROLE {quoted} LOGIN;" for quoted in HOSTILE_ROLES.values()]
    sql += [f"CREATE DATABASE {quoted};" for quoted in HOSTILE_DBS.values()]
    pg.psql("\n".join(sql))
    return pg


async def session(pg: TempCluster, *, user: str = "app", database: str = "postgres",
                  app: str = "plain", query: str = "SELECT 1") -> asyncpg.Connection:
    """An idle session that ran ``query`` (simple protocol) as ``user`` in ``database``."""
    conn = await asyncpg.connect(host=pg.host, port=pg.port, user=user, database=database,
                                 server_settings={"application_name": app}, timeout=10)
    await conn.execute(query)
    return conn


def policy_file(path: Path, pg: TempCluster, audit: Path, query_mode: str,
                applications: list[str] | None = None) -> Path:
    policy: dict[str, Any] = {"name": "idle", "state": "idle", "longer_than": f"{THRESHOLD}s"}
    if applications:
        policy["applications"] = applications
    doc = {
        "targets": [{"name": "main", "dsn": pg.dsn(WATCHDOG_ROLE)}],
        "exclude": {"superusers": True, "applications": ["psql", "admin"]},
        "policies": [policy],
        "audit": {"path": str(audit), "query": query_mode},
    }
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


async def seen(admin: asyncpg.Connection, pids: list[int]) -> dict[int, dict[str, Any]]:
    """What pg_stat_activity shows of ``pids``, as the superuser sees it."""
    rows = await admin.fetch(
        "SELECT pid, usename, datname, application_name, query FROM pg_stat_activity"
        " WHERE pid = ANY($1::int[])", pids)
    return {r["pid"]: dict(r) for r in rows}


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file, split on the only line break JSON Lines knows."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    records = []
    for line in raw[:-1].split(b"\n"):
        assert b"\r" not in line
        record = json.loads(line.decode("utf-8"))  # each line one complete, valid object
        assert isinstance(record, dict)
        records.append(record)
    return records


TABLE_ROW = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  ")


def table_rows(text: str, expected: int) -> list[str]:
    """The data rows of a table printed for people, after checking it is terminal-safe."""
    assert ESC not in text
    assert "\u202e" not in text and "\u2028" not in text and "\x85" not in text
    lines = text.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("TIME ")]
    assert len(header) == 1, text
    rows = lines[header[0] + 1:]
    # A raw newline inside a value would make an extra line that is not a row.
    assert all(TABLE_ROW.match(row) for row in rows), rows
    assert len(rows) == expected, text
    return rows


@pytest.fixture
async def admin(cluster: TempCluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cluster.dsn("postgres"), timeout=10,
                                 server_settings={"application_name": "admin"})
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def opened() -> Iterator[list[asyncpg.Connection]]:
    conns: list[asyncpg.Connection] = []
    yield conns
    for c in conns:
        c.terminate()


async def test_hostile_values_round_trip_through_the_audit_log_and_tables(
    cluster: TempCluster, admin: asyncpg.Connection, opened: list[asyncpg.Connection],
    tmp_path: Path,
) -> None:
    specs = [
        {"user": "we'ird \"user\"", "app": "it's \"quoted\" \\ back`slash`"},
        {"user": "ユーザー😀", "database": "my data base", "app": "日本語アプリ😀"},
        {"user": "evil\n\x1b[31m\u202euser\t", "database": "données ☃\ttab",
         "app": "nl\nnl tab\t esc\x1b[31m rtl\u202e", "query": HOSTILE_QUERY},
        {"app": "x" * 80},  # application_name keeps 63 bytes
        {"app": "é" * 40},  # 80 bytes of UTF-8, cleaned and cut by the server
        {"query": HOSTILE_QUERY},
    ]
    for spec in specs:
        opened.append(await session(cluster, **spec))
    pids = [c.get_server_pid() for c in opened]
    before = await seen(admin, pids)
    assert set(before) == set(pids)
    assert before[pids[3]]["application_name"] == "x" * 63
    assert len(before[pids[4]]["application_name"].encode()) <= 63
    assert before[pids[2]]["usename"] == "evil\n\x1b[31m\u202euser\t"  # the server keeps it
    assert before[pids[5]]["query"] == HOSTILE_QUERY

    await asyncio.sleep(THRESHOLD + 0.2)
    audit = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path / "p.yaml", cluster, audit, "full")
    once = await run_cli("once", "-c", config)
    assert once.rc == 0, once.stderr
    assert "Traceback" not in once.stderr

    records = audit_lines(audit)
    assert sorted(r["pid"] for r in records) == sorted(pids)
    for r in records:
        assert r["outcome"] == "terminated", r
        want = before[r["pid"]]
        for key in ("usename", "datname", "application_name", "query"):
            assert r[key] == want[key], (key, r[key], want[key])

    rows = table_rows(once.stdout, len(pids))
    assert any("evil\\n\\x1b[31m\\u202euser\\t"[:20] in row for row in rows), rows
    review = await run_cli("audit", "--file", audit)
    assert review.rc == 0, review.stderr
    table_rows(review.stdout, len(pids))

    as_json = await run_cli("audit", "--file", audit, "--json")
    assert as_json.rc == 0 and ESC not in as_json.stdout
    lines = as_json.stdout.splitlines()  # safe to split: the reviewer escapes U+2028 and NEL
    assert [json.loads(line) for line in lines] == records


@pytest.mark.parametrize(("mode", "cut"), [("full", None), ("truncate", 256), ("omit", 0)])
async def test_query_text_per_audit_query_mode(
    cluster: TempCluster, admin: asyncpg.Connection, opened: list[asyncpg.Connection],
    tmp_path: Path, mode: str, cut: int | None,
) -> None:
    long_query = HOSTILE_QUERY + ", '" + "ü" * 600 + "'"  # longer than 256 and than 1024 bytes
    opened.append(await session(cluster, app=f"mode-{mode}", query=long_query))
    pid = opened[-1].get_server_pid()
    shown = (await seen(admin, [pid]))[pid]["query"]
    # track_activity_query_size (1024 bytes by default) cuts it at a character boundary.
    assert long_query.startswith(shown) and len(shown.encode()) <= 1023

    await asyncio.sleep(THRESHOLD + 0.2)
    audit = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path / "p.yaml", cluster, audit, mode, [f"mode-{mode}"])
    once = await run_cli("once", "-c", config)
    assert once.rc == 0, once.stderr
    (record,) = audit_lines(audit)
    assert record["pid"] == pid
    expected = shown if cut is None else (shown[:cut] if cut else None)
    assert record["query"] == expected


@pytest.fixture
def big_cluster(cluster: TempCluster, make_cluster: Any) -> TempCluster:
    """A server that keeps up to 1 MB of each session's query text."""
    pg = make_cluster(cluster.major, max_connections=12,
                      settings={"track_activity_query_size": "'1MB'"})
    setup_roles(pg)
    return pg


async def test_megabyte_queries_reach_the_audit_log_per_mode(
    big_cluster: TempCluster, opened: list[asyncpg.Connection], tmp_path: Path,
) -> None:
    chunk = "é😀\u202e\x1b[31m\n\t" + "y" * 90  # multibyte and control characters throughout
    body = chunk * (1_300_000 // len(chunk.encode()))
    query = f"SELECT length($q${body}$q$)"  # ~1.3 MB, longer than the server keeps
    modes = ("full", "truncate", "omit")
    for mode in modes:
        opened.append(await session(big_cluster, app=f"mb-{mode}", query=query))
    pids = [c.get_server_pid() for c in opened]
    admin = await asyncpg.connect(big_cluster.dsn("postgres"), timeout=10)
    try:
        shown = {pid: row["query"] for pid, row in (await seen(admin, pids)).items()}
    finally:
        await admin.close()
    for text in shown.values():
        assert query.startswith(text)
        assert 1_000_000 < len(text.encode()) < 1024 * 1024  # cut at 1 MB - 1 byte

    await asyncio.sleep(THRESHOLD + 0.2)
    for mode, pid in zip(modes, pids, strict=True):
        audit = tmp_path / f"audit-{mode}.jsonl"
        config = policy_file(tmp_path / f"{mode}.yaml", big_cluster, audit, mode, [f"mb-{mode}"])
        once = await run_cli("once", "-c", config, timeout=60)
        assert once.rc == 0, once.stderr
        table_rows(once.stdout, 1)
        (record,) = audit_lines(audit)
        assert record["pid"] == pid
        assert record["outcome"] == "terminated"
        want = {"full": shown[pid], "truncate": shown[pid][:256], "omit": None}[mode]
        assert record["query"] == want
        review = await run_cli("audit", "--file", audit, timeout=60)
        assert review.rc == 0, review.stderr
        table_rows(review.stdout, 1)


# -- text the server does not convert ---------------------------------------------------
# "é" in a LATIN1 database is the single byte 0xE9; a SQL_ASCII database keeps whatever bytes
# the client sent. The watchdog's own database is UTF8, so both reach it as invalid UTF-8.
NON_UTF8 = {"latin1_db": "LATIN1", "ascii_db": "SQL_ASCII"}


@pytest.fixture(scope="module")
def encodings(cluster: TempCluster) -> TempCluster:
    cluster.psql("\n".join(
        f"CREATE DATABASE {name} ENCODING '{enc}' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C';"
        f" GRANT ALL ON DATABASE {name} TO app;"
        for name, enc in NON_UTF8.items()
    ))
    # A role created from a LATIN1 session: its name is stored as LATIN1 bytes.
    psql_run(cluster, "latin1_db", "postgres", b"CREATE ROLE \"jos\xe9\" LOGIN;\n")
    cluster.sync_passwords()  # it logs in over TCP below
    return cluster


def _psql(pg: TempCluster, database: str, user: str, app: str) -> tuple[list[str], dict[str, str]]:
    cmd = [str(pg.bindir / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-h", pg.host,
           "-p", str(pg.port), "-U", user, "-d", database]
    env = {"PATH": os.environ.get("PATH", ""), "PGCLIENTENCODING": "LATIN1", "PGAPPNAME": app,
           "PGPASSFILE": os.environ["PGPASSFILE"]}
    return cmd, env


def psql_raw(pg: TempCluster, database: str, user: str, sql: bytes,
             app: str = "encoding-victim") -> subprocess.Popen[bytes]:
    """psql sending ``sql`` as raw LATIN1 bytes, then staying connected, idle."""
    cmd, env = _psql(pg, database, user, app)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    assert proc.stdin is not None
    proc.stdin.write(sql)
    proc.stdin.flush()
    return proc


def psql_run(pg: TempCluster, database: str, user: str, sql: bytes) -> None:
    cmd, env = _psql(pg, database, user, "admin")
    res = subprocess.run(cmd, input=sql, capture_output=True, env=env, timeout=30, check=False)
    assert res.returncode == 0, res.stderr


async def test_bytes_that_are_not_utf8_never_blind_a_sweep_and_reach_the_audit_log(
    encodings: TempCluster, admin: asyncpg.Connection, tmp_path: Path,
) -> None:
    victims = [
        psql_raw(encodings, "latin1_db", "app", b"SELECT 'caf\xe9';\n"),
        psql_raw(encodings, "ascii_db", "app", b"SELECT 'na\xefve \xff\xfe';\n"),
        psql_raw(encodings, "latin1_db", "jos\xe9".encode("latin-1"), b"SELECT 'ol\xe9';\n"),
    ]
    try:
        async def idle() -> bool:
            n = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE"
                                     " application_name = 'encoding-victim' AND state = 'idle'")
            return int(n) == len(victims)

        await wait_for(idle, timeout=20, what="the psql victims to sit idle")
        await asyncio.sleep(THRESHOLD + 0.2)
        audit = tmp_path / "audit.jsonl"
        config = policy_file(tmp_path / "p.yaml", encodings, audit, "full", ["encoding-victim"])
        status = await run_cli("status", "-c", config, "--explain")
        assert status.rc == 0 and "Traceback" not in status.stderr, status.stderr
        once = await run_cli("once", "-c", config)
        assert once.rc == 0 and "Traceback" not in once.stderr, once.stderr
        records = {r["query"]: r for r in audit_lines(audit)}
        # Lossless: valid UTF-8 stays as it is, every other byte is kept as \xNN.
        assert set(records) == {"SELECT 'caf\\xe9';", "SELECT 'na\\xefve \\xff\\xfe';",
                                "SELECT 'ol\\xe9';"}, records
        assert all(r["outcome"] == "terminated" for r in records.values())
        assert records["SELECT 'ol\\xe9';"]["usename"] == "jos\\xe9"
        assert records["SELECT 'caf\\xe9';"]["datname"] == "latin1_db"
    finally:
        for proc in victims:
            proc.kill()
            proc.wait(10)
            assert proc.stdin is not None
            proc.stdin.close()
