"""PgBouncer is read only when it must be, and its logins name no metric series.

SHOW SOCKETS costs PgBouncer a pass over every connection in its single thread: the watchdog
runs it only when a backend from the pooler's address is a candidate, and at most once a
second. The reads are counted in PgBouncer's own log (``verbose = 2`` logs every console
query as "got admin query: ..."), never inferred from timing.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_pgbouncer
from daemon import Daemon
from helpers import free_port, sweeps_ran, wait_for
from pgwire import WireClient
from scenario import APP_ROLE
from temppooler import TempPooler
from test_pgbouncer import (
    REAL_CLIENT,
    MakePooler,
    backend_where,
    past,
    sample,
    scrape,
    watching,
    write_policies,
)

from watchdog.commands.demo.tempcluster import TempCluster

# The PgBouncer fixtures of test_pgbouncer (and whatever versions they are run over).
roles = test_pgbouncer.roles
make_pooler = test_pgbouncer.make_pooler
VERBOSE = {"verbose": "2"}


def reads(pooler: TempPooler, command: str = "SHOW SOCKETS") -> int:
    """How many times PgBouncer has received ``command`` on its console."""
    text = pooler.log_path.read_text(errors="replace") if pooler.log_path.exists() else ""
    return sum(1 for line in text.splitlines() if line.endswith(f"got admin query: {command}"))


async def test_a_sweep_without_candidates_does_not_read_sockets(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    pg = roles
    pooler = make_pooler(pool_mode="session", settings=VERBOSE)
    client = await WireClient.connect(pooler.port, APP_ROLE, "postgres", source=REAL_CLIENT)
    try:
        await client.query("SELECT 1")
        pid = await backend_where(pg, "the session's server", state="idle")
        far = write_policies(tmp_path, pg, pooler, idle="1h", idle_in_transaction="1h")
        async with watching(far) as watch:
            rounds = [(await watch.sweep()).poolers for _ in range(5)]
            assert watch.sweeps == 5 and all(r.errors == {} for r in rounds)
            assert reads(pooler) == 0
            assert reads(pooler, "SHOW POOLS") >= 1  # its health, a few rows, once per interval
            assert all(r.read == frozenset() for r in rounds)
        # The same backend past a threshold (dry run: it stays) is a candidate: now it is read.
        near = write_policies(tmp_path, pg, pooler, idle="1s", extra={"dry_run": True})
        await past(1.1)
        async with watching(near) as watch:
            report = await watch.sweep()
            assert report.poolers.read == frozenset({"pgb1"})
            assert report.snapshot.pooled[pid].client is not None
        assert reads(pooler) == 1
    finally:
        client.close()


async def test_sweeps_every_250ms_read_pgbouncer_at_most_once_a_second(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    pg = roles
    pooler = make_pooler(pool_mode="transaction", settings=VERBOSE)
    port = free_port()
    # A pooled server idle past the 1 s policy: a candidate on every sweep (spared, pooled).
    client = await WireClient.connect(pooler.port, APP_ROLE, "postgres")
    try:
        await client.query("SELECT 1")
        await backend_where(pg, "the pooled server", state="idle")
        path = write_policies(tmp_path, pg, pooler, interval="250ms", extra={
            "metrics": {"listen": f"127.0.0.1:{port}"}})
        with Daemon(path) as daemon:

            def sweeps() -> float:
                return sample(port, "pg_watchdog_sweeps_total", target="main") or 0.0

            await wait_for(lambda: reads(pooler) >= 1, 30, interval=0.1,
                           what=f"a first read {daemon.log()}")
            started, swept, read = time.monotonic(), sweeps(), reads(pooler)
            await sweeps_ran(pg, 12)
            elapsed = time.monotonic() - started
            swept, read = sweeps() - swept, reads(pooler) - read
            assert daemon.stop() == 0
    finally:
        client.close()
    assert 1 <= read <= elapsed + 1, (read, elapsed)
    assert swept > read, (swept, read)


# -- clients that never logged in ---------------------------------------------------------------


@pytest.fixture
def hba_file() -> Iterator[Path]:
    """PgBouncer's auth_hba_file: trust from 127.0.0.1, a password from anywhere else."""
    where = Path(tempfile.mkdtemp(prefix="pg-watchdog-hba-"))
    where.chmod(0o755)
    path = where / "pgbouncer_hba.conf"
    path.write_text("host all all 127.0.0.1/32 trust\nhost all all 0.0.0.0/0 md5\n")
    path.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    try:
        yield path
    finally:
        shutil.rmtree(where, ignore_errors=True)


async def stuck_in_login(port: int, user: str, database: str, source: str) -> WireClient:
    """A client that sends its startup packet and never answers the password request."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    params = f"user\0{user}\0database\0{database}\0\0".encode()
    body = struct.pack("!i", 196608) + params
    writer.write(struct.pack("!i", len(body) + 4) + body)
    await writer.drain()
    assert (await reader.readexactly(1)) == b"R"  # the password request, left unanswered
    return WireClient(reader, writer)


async def test_logins_name_no_pool_series(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path, hba_file: Path
) -> None:
    pg = roles
    pooler = make_pooler(pool_mode="session",
                         settings={"auth_type": "hba", "auth_hba_file": str(hba_file)})
    port = free_port()
    app = await WireClient.connect(pooler.port, APP_ROLE, "postgres", application_name="app")
    logins = [
        # An unknown user (PgBouncer shows it with database "(nodb)"), and a known one asking
        # for a database of its choosing (PgBouncer creates that pool before the password).
        await stuck_in_login(pooler.port, 'evil"} 1\nfake_metric{x="', "whatever", "127.0.0.9"),
        await stuck_in_login(pooler.port, APP_ROLE, "chosen_by_a_stranger", "127.0.0.9"),
    ]
    try:
        await app.query("SELECT 1")
        path = write_policies(tmp_path, pg, pooler, idle="1h", interval="1s", extra={
            "metrics": {"listen": f"127.0.0.1:{port}"}})
        with Daemon(path) as daemon:
            pool = {"target": "main", "pooler": "pgb1", "database": "postgres", "user": APP_ROLE}
            await wait_for(lambda: sample(port, "pg_watchdog_pooler_clients_active", **pool) == 1,
                           30, interval=0.2, what=f"the app's pool {daemon.log()}")
            series = [(name, dict(labels)) for name, labels in scrape(port)
                      if name.startswith("pg_watchdog_pooler_")]
            # Every client counts against max_client_conn: the logins and the console too.
            clients = sample(port, "pg_watchdog_pooler_clients", target="main", pooler="pgb1")
            assert daemon.stop() == 0
    finally:
        for c in (app, *logins):
            c.close()
    pools = {(labels["database"], labels["user"]) for _, labels in series if "database" in labels}
    assert ("postgres", APP_ROLE) in pools, pools
    chosen = {"(nodb)", "chosen_by_a_stranger"}
    strangers = [labels for _, labels in series
                 if {labels.get("database"), labels.get("user")} & chosen
                 or "evil" in labels.get("user", "")]
    assert strangers == [], strangers
    assert clients == 4
