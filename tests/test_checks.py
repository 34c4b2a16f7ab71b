"""`pg-watchdog check --connect` against real servers: the least-privilege role passes, each
missing grant fails naming the GRANT, an unreachable target fails without leaking secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from helpers import free_port

from watchdog.commands.demo.tempcluster import TempCluster

MakeCluster = Callable[..., TempCluster]
# PGPASSFILE: the passfile of the throwaway servers (conftest exports it before this runs).
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k == "PGPASSFILE"}

POLICY = """
targets:
  - name: main
    dsn: {dsn}
exclude:
  superusers: {superusers}
policies:
  - name: idle
    state: idle
    longer_than: 10m
"""


def check(tmp_path: Path, dsn: str, superusers: bool = True) -> tuple[int, list[str], str]:
    """Run the CLI; the exit code, the check lines (level first) and stderr."""
    path = tmp_path / "policies.yaml"
    path.write_text(POLICY.format(dsn=dsn, superusers=str(superusers).lower()))
    proc = subprocess.run(
        [sys.executable, "-m", "watchdog", "check", "--connect", "-c", str(path)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=False,
    )
    lines = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
    return proc.returncode, lines, proc.stderr


def levels(lines: list[str]) -> set[str]:
    return {line.split()[0] for line in lines}


def test_least_privilege_role_passes_every_check(
    pg: TempCluster, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    grants = "CREATE ROLE watchdog LOGIN; GRANT pg_monitor, pg_signal_backend TO watchdog;"
    server = pg
    if pg.major >= 16:
        server = make_cluster(pg.major, settings={"reserved_connections": "2"})
        grants += " GRANT pg_use_reserved_connections TO watchdog;"
    server.psql(grants)
    code, lines, err = check(tmp_path, server.dsn("watchdog"))
    assert (code, err) == (0, ""), lines
    assert levels(lines) == {"ok"}, lines
    assert any(f"server is PostgreSQL {pg.major}." in line for line in lines)
    assert "ok    connected as role watchdog (not a superuser)" in lines
    assert "ok    can signal sessions (pg_signal_backend)" in lines
    assert any("pg_read_all_stats" in line for line in lines)
    if pg.major >= 16:
        assert ("ok    reserved_connections = 2; watchdog may use them"
                " (pg_use_reserved_connections)") in lines
    else:
        assert any("reserves slots for superusers only" in line for line in lines)
    assert any(line.startswith("ok    headroom ") for line in lines)


def test_role_without_pg_signal_backend_fails_naming_the_grant(
    pg: TempCluster, tmp_path: Path
) -> None:
    pg.psql("CREATE ROLE wd_nosignal LOGIN; GRANT pg_monitor TO wd_nosignal;")
    code, lines, err = check(tmp_path, pg.dsn("wd_nosignal"))
    assert code == 1
    assert "FAIL  cannot signal sessions: GRANT pg_signal_backend TO wd_nosignal;" in lines
    assert [line for line in lines if line.startswith("FAIL")] == [
        "FAIL  cannot signal sessions: GRANT pg_signal_backend TO wd_nosignal;"
    ]
    assert err == "pg-watchdog: check failed for main\n"


def test_role_without_pg_monitor_fails_naming_the_grant(pg: TempCluster, tmp_path: Path) -> None:
    pg.psql("CREATE ROLE wd_nomonitor LOGIN; GRANT pg_signal_backend TO wd_nomonitor;")
    code, lines, _ = check(tmp_path, pg.dsn("wd_nomonitor"))
    assert code == 1
    [fail] = [line for line in lines if line.startswith("FAIL")]
    assert "GRANT pg_monitor TO wd_nomonitor;" in fail and "pg_read_all_stats" in fail


def test_unreachable_target_fails_without_printing_the_password(tmp_path: Path) -> None:
    dsn = f"postgresql://watchdog:s3cr3t-pw@127.0.0.1:{free_port()}/postgres"
    code, lines, err = check(tmp_path, dsn)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("FAIL  cannot connect: ")
    assert "s3cr3t" not in "".join(lines) + err


def test_superusers_not_excluded_is_a_warning_not_a_failure(
    pg: TempCluster, tmp_path: Path
) -> None:
    pg.psql("CREATE ROLE wd_warn LOGIN; GRANT pg_monitor, pg_signal_backend TO wd_warn;")
    code, lines, err = check(tmp_path, pg.dsn("wd_warn"), superusers=False)
    assert (code, err) == (0, ""), lines
    assert "FAIL" not in levels(lines)
    assert any(line.startswith("warn") and "exclude.superusers is false" in line for line in lines)


def test_reserved_connections_gaps_are_warnings(pg: TempCluster, tmp_path: Path) -> None:
    # The module's cluster has reserved_connections = 0 (its default). Each line says both
    # whether reserved_connections is set and whether the role may use it, on 16, 17 and 18.
    pg.psql("CREATE ROLE wd_noreserve LOGIN; GRANT pg_monitor, pg_signal_backend TO wd_noreserve;")
    code, lines, _ = check(tmp_path, pg.dsn("wd_noreserve"))
    assert code == 0, lines
    if pg.major < 16:
        assert levels(lines) == {"ok"}
        return
    assert (
        "warn  reserved_connections is 0 (not set); wd_noreserve cannot use them (no"
        " pg_use_reserved_connections): a reconnect to a full server fails:"
        " GRANT pg_use_reserved_connections TO wd_noreserve;"
        " ALTER SYSTEM SET reserved_connections = 3;  -- then restart" in lines
    ), lines
    pg.psql("GRANT pg_use_reserved_connections TO wd_noreserve;")
    code, lines, _ = check(tmp_path, pg.dsn("wd_noreserve"))
    assert code == 0, lines
    assert (
        "warn  reserved_connections is 0 (not set); wd_noreserve may use them"
        " (pg_use_reserved_connections): a reconnect to a full server fails:"
        " ALTER SYSTEM SET reserved_connections = 3;  -- then restart" in lines
    ), lines


def test_reserved_connections_set_but_not_granted(
    pg: TempCluster, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    if pg.major < 16:
        return  # no reserved_connections before 16: the test above covers 15
    server = make_cluster(pg.major, settings={"reserved_connections": "2"})
    server.psql("CREATE ROLE watchdog LOGIN; GRANT pg_monitor, pg_signal_backend TO watchdog;")
    code, lines, _ = check(tmp_path, server.dsn("watchdog"))
    assert code == 0, lines
    assert (
        "warn  reserved_connections = 2; watchdog cannot use them (no"
        " pg_use_reserved_connections): a reconnect to a full server fails:"
        " GRANT pg_use_reserved_connections TO watchdog;" in lines
    ), lines
    code, lines, _ = check(tmp_path, server.dsn("postgres"))
    assert (
        "ok    postgres is a superuser: may use the 3 superuser_reserved_connections when the"
        " server is full (reserved_connections = 2)" in lines
    ), lines


def test_printed_grants_name_a_keyword_role_and_only_it(pg: TempCluster, tmp_path: Path) -> None:
    # Unquoted, GRANT ... TO user grants to CURRENT_USER: whoever pastes it.
    pg.psql('CREATE ROLE "user" LOGIN; GRANT pg_monitor TO "user";')
    code, lines, _ = check(tmp_path, pg.dsn("user"))
    assert code == 1
    [fail] = [line for line in lines if line.startswith("FAIL")]
    grant = fail.split(": ", 1)[1]
    assert grant == 'GRANT pg_signal_backend TO "user";', fail
    members = ("SELECT r.rolname, m.rolname FROM pg_auth_members a JOIN pg_roles r"
               " ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member ORDER BY 1, 2")
    before = pg.psql(members)
    after = pg.psql(f"BEGIN; {grant} {members}; ROLLBACK;")
    added = set(after.splitlines()) - set(before.splitlines())
    assert added == {"pg_signal_backend|user"}, added


def test_superuser_role_passes_with_a_least_privilege_warning(
    pg: TempCluster, tmp_path: Path
) -> None:
    code, lines, _ = check(tmp_path, pg.dsn("postgres"))
    assert code == 0, lines
    assert "FAIL" not in levels(lines)
    assert any(line.startswith("warn  connected as postgres, a superuser") for line in lines)
