"""`pg-watchdog status` against real servers: counts, --explain verdicts, hostile names,
unreachable targets and --watch."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import connect, free_port, wait_for

from watchdog.commands.demo.tempcluster import TempCluster

HOSTILE_ROLE = "bad\n\x1b[31mrole"
# PGPASSFILE: the passfile of the throwaway servers (conftest exports it before this runs).
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k == "PGPASSFILE"}
OTHERS = " FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
END_OTHERS = "SELECT pg_terminate_backend(pid)" + OTHERS
COUNT_OTHERS = "SELECT count(*)" + OTHERS
IDLE_PAST_1S = (
    "SELECT bool_and(now() - state_change > interval '1.1 s')" + OTHERS + " AND state = 'idle'"
)

POLICY = """
targets:
{targets}
exclude:
  superusers: true
  applications: ["pg_dump*"]
  listeners: true
policies:
  - name: idle
    state: idle
    longer_than: 1s
  - name: stuck
    state: [idle in transaction, idle in transaction (aborted)]
    longer_than: 1h
"""


def write_config(path: Path, **dsns: str) -> str:
    targets = "".join(f"  - name: {name}\n    dsn: {dsn}\n" for name, dsn in dsns.items())
    path.write_text(POLICY.format(targets=targets.rstrip("\n")))
    return str(path)


async def run_cli(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "watchdog",
        *args,
        env=ENV,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def status_json(config: str, *extra: str) -> dict[str, Any]:
    code, out, err = await run_cli("status", "-c", config, "--json", *extra)
    assert (code, err) == (0, "")
    reports: list[dict[str, Any]] = json.loads(out)["targets"]
    assert len(reports) == 1
    return reports[0]


def end_other_sessions(pg: TempCluster) -> None:
    pg.psql(END_OTHERS)


@pytest.fixture(scope="module")
def roles(pg: TempCluster) -> Iterator[None]:
    pg.psql(
        "CREATE ROLE watchdog LOGIN; GRANT pg_monitor, pg_signal_backend TO watchdog;"
        " CREATE ROLE app LOGIN;"
        ' CREATE ROLE U&"bad\\000a\\001b[31mrole" LOGIN;'
    )
    yield


@pytest.fixture
async def mix(pg: TempCluster, roles: None) -> AsyncIterator[dict[str, list[int]]]:
    """A known mix of sessions, by kind, with their pids; nothing else connected."""
    end_other_sessions(pg)
    await wait_for(
        lambda: pg.psql(COUNT_OTHERS) == "0",
        what="no leftover sessions",
    )
    conns: list[asyncpg.Connection] = []
    pids: dict[str, list[int]] = {}
    sleeping: asyncio.Future[str] | None = None

    async def open_(kind: str, user: str = "app", app: str | None = None) -> asyncpg.Connection:
        conn = await connect(pg, user, application_name=app or kind)
        conns.append(conn)
        pids.setdefault(kind, []).append(conn.get_server_pid())
        return conn

    try:
        for _ in range(3):
            await open_("web")
        for _ in range(2):
            await (await open_("worker")).execute("BEGIN; SELECT 1")
        await open_("admin", user="postgres")
        await open_("pg_dump")
        await (await open_("listener")).execute("LISTEN wd_test")
        sleeper = await open_("sleeper")
        sleeping = asyncio.ensure_future(sleeper.execute("SELECT pg_sleep(60)"))
        await wait_for(
            lambda: (
                pg.psql(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'sleeper' AND state = 'active'"
                    " AND query LIKE '%pg_sleep%'"
                )
                == "1"
            ),
            what="the pg_sleep session to be active",
        )
        yield pids
    finally:
        end_other_sessions(pg)  # pg_sleep would outlive a closed socket
        for conn in conns:
            conn.terminate()
        if sleeping is not None:
            await asyncio.gather(sleeping, return_exceptions=True)


async def test_counts_by_state_user_and_application_include_the_watchdogs_own_slot(
    pg: TempCluster, mix: dict[str, list[int]], tmp_path: Path
) -> None:
    r = await status_json(write_config(tmp_path / "p.yaml", main=pg.dsn("watchdog")))
    assert r["used"] == 10  # the 9 sessions of the mix, and the watchdog's own
    assert r["by_state"] == {"idle": 6, "active": 2, "idle in transaction": 2}
    assert r["by_user"] == {"app": 8, "postgres": 1, "watchdog": 1}
    assert r["by_application"] == {
        "web": 3,
        "worker": 2,
        "admin": 1,
        "listener": 1,
        "pg-watchdog": 1,
        "pg_dump": 1,
        "sleeper": 1,
    }
    assert r["max_connections"] == 30
    assert r["superuser_reserved_connections"] == 3
    assert r["reserved_connections"] == (0 if pg.major >= 16 else None)
    assert (r["capacity"], r["headroom"], r["saturation_pct"]) == (27, 17, 37.0)
    assert r["hidden_sessions"] == 0
    assert r["server_version"].startswith(f"{pg.major}.")
    assert r["oldest_idle_s"] >= 0 and r["oldest_idle_in_transaction_s"] >= 0
    assert all(r["own_pid"] not in pids for pids in mix.values())
    assert "explain" not in r


EDGE = """
targets:
  - name: main
    dsn: {dsn}
exclude:
  superusers: true
policies:
  - name: full
    state: idle
    longer_than: 1s
    when: {{connections_above: 90%}}
"""


async def test_status_counts_used_as_the_policies_do_at_the_edge_of_a_90_percent_policy(
    pg: TempCluster, roles: None, tmp_path: Path
) -> None:
    """24 sessions and the watchdog's own fill 25 of 27 slots (92.6 %): the policy acts, and
    status must not say 24 (88.9 %), nor check --connect."""
    end_other_sessions(pg)
    await wait_for(lambda: pg.psql(COUNT_OTHERS) == "0", what="no leftover sessions")
    config = tmp_path / "edge.yaml"
    config.write_text(EDGE.format(dsn=pg.dsn("watchdog")))
    conns = [await connect(pg, "app", application_name=f"edge-{i}") for i in range(24)]
    try:
        await wait_for(lambda: pg.psql(IDLE_PAST_1S) == "t", what="idle sessions past 1s")
        r = await status_json(str(config))
        assert r["capacity"] == 27
        acting = [a for a in r["next_actions"] if a["acting"]]
        assert {a["policy"] for a in acting} == {"full"} and len(acting) == 24
        assert (r["used"], r["headroom"], r["saturation_pct"]) == (25, 2, 92.6)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watchdog", "check", "--connect", "-c", str(config),
            env=ENV, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        [headroom] = [line for line in out.decode().splitlines() if "headroom" in line]
        assert "25 of 27 ordinary slots used (93%)" in headroom, headroom
    finally:
        for conn in conns:
            conn.terminate()


async def test_explain_names_the_policy_or_the_sparing_rule_of_every_session(
    pg: TempCluster, mix: dict[str, list[int]], tmp_path: Path
) -> None:
    await wait_for(
        lambda: pg.psql(IDLE_PAST_1S) == "t",
        what="idle sessions older than 1s",
    )
    r = await status_json(write_config(tmp_path / "p.yaml", main=pg.dsn("watchdog")), "--explain")
    by_pid = {e["pid"]: e for e in r["explain"]}
    for pid in mix["web"]:
        assert by_pid[pid]["verdict"] == "policy idle acts now"
        assert (by_pid[pid]["policy"], by_pid[pid]["acting"]) == ("idle", True)
    for pid in mix["worker"]:
        e = by_pid[pid]
        assert (e["policy"], e["acting"], e["state"]) == ("stuck", False, "idle in transaction")
        # 1 h minus however long the fixture, the wait and the CLI's start took (load).
        assert 3600 - 300 < e["due_in_s"] < 3600
        assert re.fullmatch(r"policy stuck in 5\dm\d\ds", e["verdict"]), e
    spared = {
        "admin": "superuser",
        "pg_dump": "excluded application 'pg_dump'",
        "listener": "listener (last statement was LISTEN)",
        "sleeper": "no policy for state 'active'",
    }
    for kind, reason in spared.items():
        [pid] = mix[kind]
        assert (by_pid[pid]["policy"], by_pid[pid]["verdict"]) == (None, reason)
    assert by_pid[r["own_pid"]]["verdict"] == "the watchdog's own connection"
    others = [e for e in r["explain"] if e["backend_type"] != "client backend"]
    assert others and all(e["verdict"].startswith("not a client backend (") for e in others)
    assert r["due_now"] == 3
    assert [(a["pid"], a["acting"]) for a in r["next_actions"]] == [
        *((pid, True) for pid in sorted(mix["web"])),
        *((pid, False) for pid in sorted(mix["worker"])),
    ]


async def test_hostile_user_names_are_escaped_in_text_and_json(
    pg: TempCluster, roles: None, tmp_path: Path
) -> None:
    conn = await connect(pg, HOSTILE_ROLE, application_name="evil")
    try:
        config = write_config(tmp_path / "p.yaml", main=pg.dsn("watchdog"))
        code, out, err = await run_cli("status", "-c", config, "--explain")
        assert (code, err) == (0, "")
        assert "\x1b" not in out and HOSTILE_ROLE not in out
        shown = [
            line for line in out.splitlines() if line.split()[:1] == [str(conn.get_server_pid())]
        ]
        assert len(shown) == 1 and "bad\\n\\x1b[31mrole" in shown[0]
        assert "by user" in out and "bad\\n\\x1b[31mrole 1" in out
        code, out, err = await run_cli("status", "-c", config, "--json")
        assert (code, err) == (0, "")
        assert "\x1b" not in out and out.count("\n") == 1
        assert json.loads(out)["targets"][0]["by_user"][HOSTILE_ROLE] == 1
    finally:
        await conn.close()


async def test_unreachable_target_exits_1_with_one_line_and_no_password(
    pg: TempCluster, roles: None, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "p.yaml",
        main=pg.dsn("watchdog"),
        down=f"postgresql://watchdog:s3cr3t-pw@127.0.0.1:{free_port()}/postgres",
    )
    code, out, err = await run_cli("status", "-c", config, "--json")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("pg-watchdog: down: ")
    assert "s3cr3t" not in err + out
    main, down = json.loads(out)["targets"]
    assert main["target"] == "main" and main["capacity"] == 27
    assert down["target"] == "down" and "error" in down
    code, out, err = await run_cli("status", "-c", config)
    assert code == 1 and err.count("\n") == 1 and "s3cr3t" not in err + out
    assert out.startswith("main  PostgreSQL")


async def test_watch_redraws_on_one_held_connection_until_interrupted(
    pg: TempCluster, roles: None, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "p.yaml", main=pg.dsn("watchdog"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "watchdog",
        "status",
        "-c",
        config,
        "--json",
        "--watch",
        "0.2",
        env=ENV,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        rounds = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 15)) for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0 and err == b""
    assert b"\x1b" not in out  # not a terminal: no screen clearing
    assert len({r["targets"][0]["own_pid"] for r in rounds}) == 1
