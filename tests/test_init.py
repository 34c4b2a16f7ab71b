"""`pg-watchdog init` against real servers: a self-hosted layout with a real psql, pg_dump- and
DBeaver-named sessions and an application; an RDS-like layout (rdsadmin, rds_superuser) with
the server's own timeouts set. The file it writes passes `check --connect`, is in dry run, and
`once` with it records the application's idle sessions older than the thresholds, and only them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from conftest import MakeCluster
from helpers import connect, wait_for
from scenario import run_cli, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import load_config
from watchdog.config.units import policy_duration as duration
from watchdog.text.quoting import quote_ident

PASSWORD = "In1tS3cret!pw"  # the watchdog role's own here; it must never be written or printed
APP = "orders-api"
DBEAVER = "DBeaver 24.1.0 - Main <postgres>"


def dsn_with_password(cluster: TempCluster, user: str = "watchdog") -> str:
    """``user`` now logs in with PASSWORD: from this DSN, or (written without it) the passfile."""
    cluster.set_password(user, PASSWORD)
    return cluster.dsn(user).replace(f"{user}@", f"{user}:{PASSWORD.replace('!', '%21')}@", 1)


@contextlib.asynccontextmanager
async def sessions(cluster: TempCluster, *named: tuple[str, str]) -> AsyncIterator[list[int]]:
    """Idle sessions (role, application_name) plus a real psql sitting at its prompt."""
    conns: list[asyncpg.Connection] = []
    psql = await asyncio.create_subprocess_exec(
        str(cluster.bindir / "psql"), "-X", "-h", cluster.host, "-p", str(cluster.port),
        "-U", "app", "-d", "postgres",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        for role, name in named:
            conns.append(await connect(cluster, role, application_name=name))
            await conns[-1].execute("SELECT 1")
        admin = await connect(cluster)
        try:
            async def psql_in() -> bool:
                return bool(await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'psql'"
                    " AND state = 'idle'"))
            await wait_for(psql_in, timeout=20, what="the real psql to connect")
        finally:
            await admin.close()
        yield [c.get_server_pid() for c in conns]
    finally:
        for c in conns:
            c.terminate()
        psql.kill()
        await psql.wait()


async def init(*args: str | Path, timeout: float = 60) -> tuple[int, str, str]:
    res = await run_cli("init", *args, timeout=timeout)
    for out in (res.stdout, res.stderr):
        assert PASSWORD not in out and "In1tS3cret" not in out
    return res.rc, res.stdout, res.stderr


async def idle_for(cluster: TempCluster, pids: list[int], seconds: float) -> None:
    admin = await connect(cluster)
    try:
        async def old_enough() -> bool:
            ages = await admin.fetch(
                "SELECT extract(epoch FROM now() - state_change) AS age FROM pg_stat_activity"
                " WHERE pid = ANY($1::int[]) AND state = 'idle'", pids)
            return len(ages) == len(pids) and all(r["age"] > seconds for r in ages)
        await wait_for(old_enough, timeout=30, what=f"sessions idle for {seconds}s")
    finally:
        await admin.close()


async def test_self_hosted_init_writes_a_file_that_checks_and_spares_the_tools(
        pg: TempCluster, tmp_path: Path) -> None:
    setup_roles(pg)
    out = tmp_path / "policies.yaml"
    audit = tmp_path / "audit.jsonl"
    named = [("app", APP), ("app", APP), ("app", "pg_dump"), ("app", DBEAVER)]
    async with sessions(pg, *named) as pids:
        rc, stdout, stderr = await init(
            "--connect", dsn_with_password(pg), "-o", out, "--idle", "3s",
            "--idle-in-transaction", "2s", "--look", "1s", "--audit-path", audit)
        assert rc == 0, stderr
        assert f"wrote {out}" in stdout and "self-hosted" in stdout
        text = out.read_text()
        assert PASSWORD not in text and "In1tS3cret" not in text
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
        config = load_config(str(out))
        assert config.dry_run
        assert {"psql", "pg_dump*", "DBeaver*"} <= set(config.exclude.applications)
        assert config.exclude.superusers and config.exclude.listeners
        assert [p.longer_than for p in config.policies] == [3.0, 2.0]
        assert f"  #   {APP}: 2 (2 idle), role app" in text
        assert "# password_file: /etc/pg-watchdog/main.password" in text
        assert "#   listen: 127.0.0.1:9654" in text

        check = await run_cli("check", "-c", out, "--connect")
        assert check.rc == 0, check.stdout + check.stderr
        assert "dry run" in check.stdout

        await idle_for(pg, pids, 3.5)
        once = await run_cli("once", "-c", out, "--json")
        assert once.rc == 0, once.stderr
        records = once.json()["targets"][0]["records"]
    acted = {(r["application_name"], r["outcome"], r["policy"]) for r in records}
    assert acted == {(APP, "would_terminate", "idle")}, records
    assert sorted(r["pid"] for r in records) == sorted(pids[:2])


async def test_rds_like_init_spares_the_admin_role_and_fits_the_server_timeouts(
        pg: TempCluster, make_cluster: MakeCluster, tmp_path: Path) -> None:
    settings = {"idle_in_transaction_session_timeout": "2min"}
    if pg.major >= 17:
        settings["transaction_timeout"] = "90s"
    cluster = make_cluster(pg.major, settings=settings)
    setup_roles(cluster)
    cluster.psql("CREATE ROLE rdsadmin SUPERUSER LOGIN; CREATE ROLE rds_superuser NOLOGIN;"
                 " CREATE ROLE dbadmin LOGIN CREATEROLE CREATEDB IN ROLE rds_superuser;")
    out = tmp_path / "policies.yaml"
    async with sessions(cluster, ("app", APP), ("dbadmin", "admin-console"),
                        ("rdsadmin", "rdsadmin")) as pids:
        rc, _, stderr = await init("--connect", cluster.dsn("watchdog"), "-o", out,
                                        "--idle", "3s", "--look", "1s",
                                        "--audit-path", tmp_path / "audit.jsonl")
        assert rc == 0, stderr
        text = out.read_text()
        assert "Amazon RDS/Aurora layout" in text and "members now: dbadmin (rds_superuser)" in text
        assert "login superusers here:" in text and "rdsadmin" in text
        config = load_config(str(out))
        assert "rds_superuser" in config.exclude.member_of
        # Under the server's own timeout(s), so the watchdog acts first, with its record.
        server = 90.0 if pg.major >= 17 else 120.0
        iit = config.policies[1].longer_than
        assert iit == int(0.8 * server) and duration(iit) in text
        assert "idle_in_transaction_session_timeout = 2m00s (configuration file)" in text
        check = await run_cli("check", "-c", out, "--connect")
        assert check.rc == 0, check.stdout + check.stderr
        await idle_for(cluster, pids, 3.5)
        once = await run_cli("once", "-c", out, "--json")
        assert once.rc == 0, once.stderr
        records = once.json()["targets"][0]["records"]
    assert [(r["usename"], r["outcome"]) for r in records] == [("app", "would_terminate")]


async def test_hostile_names_seen_by_init_stay_values(pg: TempCluster, tmp_path: Path) -> None:
    setup_roles(pg)
    hostile = 'evil"\n  - x: \'y\''
    pg.psql(f"DROP ROLE IF EXISTS {quote_ident(hostile, ())};"
            f" CREATE ROLE {quote_ident(hostile, ())} LOGIN SUPERUSER;")
    try:
        async with sessions(pg, (hostile, "psql\n  - injected"), ("app", "a: b # c")):
            rc, stdout, stderr = await init("--connect", pg.dsn("watchdog"), "--look", "1s")
        assert rc == 0, stderr
        path = tmp_path / "p.yaml"
        path.write_text(stdout)
        config = load_config(str(path))
        assert config.exclude.users == ()
        assert "injected" not in " ".join(config.exclude.applications)
        assert all(line.isprintable() for line in stdout.splitlines())
        assert "\\n  - x" in stdout  # the role name, escaped, in the superusers comment
    finally:
        admin = await connect(pg)
        try:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE usename = $1", hostile)
        finally:
            await admin.close()
        pg.psql(f"DROP ROLE IF EXISTS {quote_ident(hostile, ())}")


async def test_output_is_never_overwritten_without_force(pg: TempCluster, tmp_path: Path) -> None:
    setup_roles(pg)
    out = tmp_path / "policies.yaml"
    out.write_text("keep me\n")
    rc, stdout, stderr = await init("--connect", pg.dsn("watchdog"), "-o", out, "--look", "1s")
    assert (rc, stdout) == (2, "")
    assert stderr == f"pg-watchdog: {out} exists; use --force to replace it\n"
    assert out.read_text() == "keep me\n"
    # --force replaces it whole; through a symlink, the link is replaced, not what it names.
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(victim)
    for path in (out, link):
        rc, _, stderr = await init("--connect", pg.dsn("watchdog"), "-o", path, "--force",
                                   "--look", "1s")
        assert rc == 0, stderr
        assert load_config(str(path)).dry_run and not path.is_symlink()
    assert victim.read_text() == "untouched\n"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("args, message", [
    (["--connect", "host=h bogus=1"], "pg-watchdog: --connect: bogus: unknown connection"
                                      " parameter"),
    (["--connect", "postgresql://w@h/db", "--idle", "10 minutes"],
     "pg-watchdog: --idle: '10 minutes' is not a duration"),
    (["--connect", "postgresql://w@h/db", "--target-name", "a b"],
     "pg-watchdog: --target-name: 'a b' is not a valid name"),
    (["--connect", "postgresql://w@h/db", "--interval", "10ms"],
     "pg-watchdog: --interval: '10ms' is too short"),
])
async def test_bad_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    rc, stdout, stderr = await init(*args)
    assert rc == 2 and stdout == ""
    assert stderr.startswith(message) and stderr.count("\n") == 1, stderr


async def test_an_unreachable_server_is_one_line_and_exit_1(tmp_path: Path) -> None:
    from helpers import free_port

    dsn = f"postgresql://watchdog:{PASSWORD.replace('!', '%21')}@127.0.0.1:{free_port()}/postgres"
    rc, stdout, stderr = await init("--connect", dsn, "-o", tmp_path / "p.yaml")
    assert rc == 1 and stdout == ""
    assert stderr.startswith("pg-watchdog: main: ") and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "p.yaml").exists()


async def test_without_output_it_prints_the_file(pg: TempCluster) -> None:
    setup_roles(pg)
    rc, stdout, stderr = await init("--connect", dsn_with_password(pg), "--look", "1s")
    assert rc == 0, stderr
    assert stdout.startswith("# pg-watchdog policy file written by `pg-watchdog init`")
    assert "dry_run: true" in stdout and stderr.startswith("printed: target main at ")
    await asyncio.sleep(0)
