"""Role membership on a server laid out like Amazon RDS: the admin login is no superuser but a
member of ``rds_superuser``; the shipped exclusions spare it (directly or through another role)
and still terminate an ordinary application's idle session. The watchdog connects as the
least-privilege ``watchdog`` role (pg_monitor, pg_signal_backend)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from helpers import connect, wait_for
from scenario import REPO, WATCHDOG_ROLE, is_alive, policy_file, read_audit, run_cli, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import load_config
from watchdog.pg.snapshot import take_snapshot

IDLE = 2.0
APP = "DBeaver 24.1"  # not psql: the shipped exclusions spare psql by application name


def shipped_exclude() -> dict[str, Any]:
    """The exclude section of policies/default.yaml, as shipped."""
    doc = yaml.safe_load((REPO / "policies" / "default.yaml").read_text(encoding="utf-8"))
    exclude: dict[str, Any] = doc["exclude"]
    return exclude


def rds_layout(pg: TempCluster) -> None:
    """rds_superuser (NOLOGIN), dba in it, dba2 in it through ops, app outside it (idempotent)."""
    setup_roles(pg)
    pg.psql(
        """
        SELECT format('CREATE ROLE %I %s', name, opts)
        FROM (VALUES ('rds_superuser', 'NOLOGIN'), ('ops', 'NOLOGIN'), ('dba', 'LOGIN'),
                     ('dba2', 'LOGIN'), ('reporting_admin', 'LOGIN'),
                     ('etl', 'LOGIN CREATEDB')) AS r(name, opts)
        WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) \\gexec
        GRANT rds_superuser TO dba;
        GRANT rds_superuser TO ops;
        GRANT ops TO dba2;
        """
    )
    # Sessions an earlier test left behind: gone before this one starts (the 5 s waits).
    pg.psql("SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE usename IN ('dba', 'dba2', 'late_dba', 'master')")


@pytest.fixture
async def sessions(pg: TempCluster) -> AsyncIterator[dict[str, asyncpg.Connection]]:
    """One idle session each of dba, dba2 and app, from the same application."""
    rds_layout(pg)
    conns = {user: await connect(pg, user, APP) for user in ("dba", "dba2", "app")}
    try:
        for conn in conns.values():
            await conn.execute("SELECT 1")
        yield conns
    finally:
        for conn in conns.values():
            conn.terminate()


async def idle_past(conns: dict[str, asyncpg.Connection], admin: asyncpg.Connection) -> None:
    pids = [c.get_server_pid() for c in conns.values()]

    async def old_enough() -> bool:
        n = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1) AND state = 'idle'"
            " AND now() - state_change > make_interval(secs => $2)", pids, IDLE + 0.3)
        return int(n) == len(pids)

    await wait_for(old_enough, timeout=30, what="the sessions to be idle past the threshold")


def write_policy(tmp_path: Path, pg: TempCluster, exclude: dict[str, Any],
                 policies: list[dict[str, Any]] | None = None, user: str = WATCHDOG_ROLE) -> Path:
    extra: dict[str, Any] = {
        "exclude": exclude,
        "targets": [{"name": "main", "dsn": pg.dsn(user), "interval": "30s"}],
    }
    if policies is not None:
        extra["policies"] = policies
    return policy_file(tmp_path, pg, idle=f"{IDLE:g}s", extra=extra)


async def test_shipped_exclusions_spare_rds_superuser_members_and_terminate_app(
    pg: TempCluster, admin: asyncpg.Connection, sessions: dict[str, asyncpg.Connection],
    tmp_path: Path,
) -> None:
    config = write_policy(tmp_path, pg, shipped_exclude())
    assert load_config(str(config)).member_roles() == (
        "azure_pg_admin", "cloudsqlsuperuser", "rds_superuser")
    pids = {user: conn.get_server_pid() for user, conn in sessions.items()}
    await idle_past(sessions, admin)

    status = await run_cli("status", "-c", config, "--explain", "--json")
    assert status.rc == 0, status.stderr
    verdicts = {row["pid"]: row["verdict"] for row in status.json()["targets"][0]["explain"]}
    assert verdicts[pids["dba"]] == "member of rds_superuser"
    assert verdicts[pids["dba2"]] == "member of rds_superuser"  # through ops
    assert verdicts[pids["app"]] == "policy idle acts now"

    # azure_pg_admin and cloudsqlsuperuser do not exist here: no error.
    once = await run_cli("once", "-c", config)
    assert once.rc == 0, once.stderr
    records = read_audit(tmp_path / "audit.jsonl")
    assert [(r["usename"], r["outcome"]) for r in records] == [("app", "terminated")], records
    assert records[0]["pid"] == pids["app"]
    assert await is_alive(sessions["dba"]) and await is_alive(sessions["dba2"])


async def test_without_member_of_the_admin_logins_are_terminated(
    pg: TempCluster, admin: asyncpg.Connection, sessions: dict[str, asyncpg.Connection],
    tmp_path: Path,
) -> None:
    # The other side of the test above: exclude.superusers alone does not spare them, once
    # member_of is switched off (left out, it spares the providers' admin roles).
    exclude = {**shipped_exclude(), "member_of": []}  # said explicitly: the default spares them
    config = write_policy(tmp_path, pg, exclude)
    await idle_past(sessions, admin)
    once = await run_cli("once", "-c", config)
    assert once.rc == 0, once.stderr
    users = sorted(r["usename"] for r in read_audit(tmp_path / "audit.jsonl"))
    assert users == ["app", "dba", "dba2"]


async def test_policy_member_of_filter_acts_only_on_members(
    pg: TempCluster, admin: asyncpg.Connection, sessions: dict[str, asyncpg.Connection],
    tmp_path: Path,
) -> None:
    policies = [{"name": "ops-idle", "state": "idle", "longer_than": f"{IDLE:g}s",
                 "member_of": ["ops", "no_such_role"]}]
    config = write_policy(tmp_path, pg, {"superusers": True, "member_of": []}, policies)
    await idle_past(sessions, admin)
    status = await run_cli("status", "-c", config, "--explain", "--json")
    assert status.rc == 0, status.stderr
    verdicts = {row["pid"]: row["verdict"] for row in status.json()["targets"][0]["explain"]}
    assert verdicts[sessions["app"].get_server_pid()] == (
        "ops-idle: role not a member of the policy's member_of")
    once = await run_cli("once", "-c", config)
    assert once.rc == 0, once.stderr
    records = read_audit(tmp_path / "audit.jsonl")
    assert [(r["usename"], r["policy"]) for r in records] == [("dba2", "ops-idle")], records
    assert await is_alive(sessions["dba"]) and await is_alive(sessions["app"])


def check_lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.startswith("  ")]


async def test_check_connect_names_the_layout_the_roles_and_what_they_spare(
    pg: TempCluster, admin: asyncpg.Connection, sessions: dict[str, asyncpg.Connection],
    tmp_path: Path,
) -> None:
    config = write_policy(tmp_path, pg, shipped_exclude())
    res = await run_cli("check", "--connect", "-c", config)
    assert res.rc == 0, (res.stdout, res.stderr)
    lines = check_lines(res.stdout)
    assert any(line.startswith("ok    Amazon RDS/Aurora layout (role rds_superuser exists)")
               for line in lines), lines
    roles_line = ("ok    member_of roles here: rds_superuser (spares 2 current sessions);"
                  " not on this server (no error): azure_pg_admin, cloudsqlsuperuser")
    assert roles_line in lines, "\n".join(lines)
    assert "ok    server is a primary (not in recovery)" in lines
    # dba and dba2 are spared; the admin-looking logins outside rds_superuser are not.
    [warn] = [line for line in lines if "admin-looking" in line]
    assert warn.startswith("warn  admin-looking roles the policies may kill: ")
    assert "etl (CREATEDB)" in warn and "reporting_admin (named like an admin)" in warn
    assert "dba (" not in warn and "dba2 (" not in warn

    # Without member_of, the RDS admins are named, each with the reason it looks like one.
    exclude = {**shipped_exclude(), "member_of": []}  # said explicitly: the default spares them
    res = await run_cli("check", "--connect", "-c", write_policy(tmp_path, pg, exclude))
    assert res.rc == 0, (res.stdout, res.stderr)
    [warn] = [line for line in check_lines(res.stdout) if "admin-looking" in line]
    assert "dba (member of rds_superuser)" in warn and "dba2 (member of rds_superuser)" in warn
    assert not any(line.startswith("ok    member_of roles") for line in check_lines(res.stdout))


async def test_check_connect_warns_when_the_watchdog_runs_as_a_killable_admin(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path,
) -> None:
    rds_layout(pg)
    # The classic RDS mistake: the watchdog runs as the master user, which humans use too.
    pg.psql(
        "SELECT 'CREATE ROLE master LOGIN CREATEROLE IN ROLE rds_superuser'"
        " WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'master') \\gexec\n"
        "GRANT pg_monitor, pg_signal_backend TO master;"
    )
    exclude = {"superusers": True, "users": ["etl", "reporting_admin", "dba*"], "member_of": []}
    res = await run_cli("check", "--connect", "-c",
                        write_policy(tmp_path, pg, exclude, user="master"))
    assert res.rc == 0, (res.stdout, res.stderr)
    [warn] = [line for line in check_lines(res.stdout) if "admin-looking" in line]
    assert warn == (
        "warn  admin-looking roles the policies may kill: the watchdog's own role master"
        " (member of rds_superuser, CREATEROLE); spare them with exclude.member_of or"
        " exclude.users"
    )
    # Spared by the shipped exclusions: the warning goes.
    res = await run_cli("check", "--connect", "-c",
                        write_policy(tmp_path, pg,
                                     {**exclude, "member_of": shipped_exclude()["member_of"]},
                                     user="master"))
    assert res.rc == 0, (res.stdout, res.stderr)
    assert not [line for line in check_lines(res.stdout) if "admin-looking" in line]


async def test_membership_is_read_fresh_each_sweep(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path,
) -> None:
    # A GRANT between sweeps spares the role's sessions from the next sweep on.
    rds_layout(pg)
    pg.psql("SELECT 'CREATE ROLE late_dba LOGIN' WHERE NOT EXISTS"
            " (SELECT FROM pg_roles WHERE rolname = 'late_dba') \\gexec\n"
            "REVOKE rds_superuser FROM late_dba;")
    conn = await connect(pg, "late_dba", APP)
    try:
        await conn.execute("SELECT 1")
        config = write_policy(tmp_path, pg, shipped_exclude())
        pid = conn.get_server_pid()

        async def verdict() -> str:
            status = await run_cli("status", "-c", config, "--explain", "--json")
            assert status.rc == 0, status.stderr
            rows = status.json()["targets"][0]["explain"]
            return str(next(r["verdict"] for r in rows if r["pid"] == pid))

        assert (await verdict()).startswith("policy idle in ")
        pg.psql("GRANT rds_superuser TO late_dba")
        assert await verdict() == "member of rds_superuser"
        await asyncio.sleep(IDLE + 0.3)
        once = await run_cli("once", "-c", config)
        assert once.rc == 0, once.stderr
        assert ", 0 actions" in once.stdout, once.stdout  # the sweep ran and spared it
        assert read_audit(tmp_path / "audit.jsonl") == []
        assert await is_alive(conn)
    finally:
        conn.terminate()


async def test_snapshot_lists_real_memberships_not_a_superusers_blanket_one(
    pg: TempCluster, admin: asyncpg.Connection, sessions: dict[str, asyncpg.Connection],
) -> None:
    # pg_has_role() counts a superuser as a member of every role; membership here is real.
    conn = await connect(pg, WATCHDOG_ROLE, "pg-watchdog")
    try:
        snap = await take_snapshot(conn, 10, ["ops", "rds_superuser", "no_such_role"])
    finally:
        await conn.close()
    by_pid = {s.pid: s.member_of for s in snap.sessions}
    assert by_pid[sessions["dba"].get_server_pid()] == ("rds_superuser",)
    assert by_pid[sessions["dba2"].get_server_pid()] == ("ops", "rds_superuser")
    assert by_pid[sessions["app"].get_server_pid()] == ()
    assert by_pid[admin.get_server_pid()] == ()  # postgres, a superuser


async def test_check_connect_survives_a_role_name_that_is_not_utf8(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path,
) -> None:
    # Created from a LATIN1 database, the name is stored as the byte 0xE9: no UTF-8.
    rds_layout(pg)
    pg.psql("SELECT 'CREATE DATABASE latin1_roles ENCODING ''LATIN1'' TEMPLATE template0"
            " LC_COLLATE ''C'' LC_CTYPE ''C''' WHERE NOT EXISTS"
            " (SELECT FROM pg_database WHERE datname = 'latin1_roles') \\gexec")
    cmd = [str(pg.bindir / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-h", pg.host,
           "-p", str(pg.port), "-U", "postgres", "-d", "latin1_roles"]
    env = {"PATH": os.environ.get("PATH", ""), "PGCLIENTENCODING": "LATIN1",
           "PGPASSFILE": os.environ["PGPASSFILE"]}

    def latin1(sql: bytes) -> None:
        res = subprocess.run(cmd, input=sql, capture_output=True, env=env, timeout=30,
                             check=False)
        assert res.returncode == 0, res.stderr

    latin1(b'CREATE ROLE "jos\xe9_admin" LOGIN;\n')
    try:
        res = await run_cli("check", "--connect", "-c", write_policy(tmp_path, pg,
                                                                      shipped_exclude()))
        assert res.rc == 0, (res.stdout, res.stderr)
        [warn] = [line for line in check_lines(res.stdout) if "admin-looking" in line]
        assert '"jos\\xe9_admin" (named like an admin)' in warn, warn
    finally:
        latin1(b'DROP ROLE "jos\xe9_admin";\n')


def test_member_roles_is_the_sorted_union_of_every_member_of_rule(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "targets: [{name: main}]\n"
        "exclude: {member_of: [rds_superuser, ops]}\n"
        "policies:\n"
        "  - {name: a, state: idle, longer_than: 1m, member_of: dev}\n"  # one name: a list of one
        "  - {name: b, state: idle, longer_than: 1m, exclude: {member_of: [ops, \"Ünïcode\"]}}\n"
    )
    config = load_config(str(path), environ={})
    assert config.exclude.member_of == ("rds_superuser", "ops")
    assert config.policies[0].member_of == ("dev",)
    assert config.member_roles() == ("dev", "ops", "rds_superuser", "Ünïcode")
