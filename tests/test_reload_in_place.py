"""A reload never drops the held connection or the leader lock (real `pg-watchdog run`).

Interval, poolers and password_file change in place: same backend, lock held throughout. A
new DSN is opened before the old connection closes, and one that cannot get in leaves the
old one in place. A reload waits for a sweep in flight (held up here by a lock on pg_authid,
which the snapshot reads through pg_roles) instead of cancelling it; a target removed while
its sweep runs ends quietly, and its metric series stay gone. A retired audit log is closed.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import asyncpg
import pytest
from conftest import MAJORS, MakeCluster
from daemon import Daemon, audit_records
from helpers import connect, free_port, sweeps_ran, wait_for
from notify_listener import NotifyListener
from reloading import (
    clean,
    killed,
    leader,
    lock_holder,
    policy,
    reload,
    scrape,
    sweeps_held_up,
    watchdog_pids,
)
from scenario import setup_roles

from watchdog.audit.journal import journals
from watchdog.commands.demo.tempcluster import TempCluster


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    return pg


async def test_interval_poolers_and_password_file_change_in_place(
    cluster: TempCluster, tmp_path: Path
) -> None:
    cfg = policy(tmp_path / "p.yaml", cluster)
    secret = tmp_path / "pw"
    secret.write_text(cluster.password + "\n")
    with Daemon(cfg) as d:
        pid = await leader(cluster)
        for change in (
            {"interval": "2s"},
            {"interval": "2s", "password_file": secret},
            {"interval": "2s", "password_file": secret, "pooler": True},
        ):
            policy(cfg, cluster, **change)  # type: ignore[arg-type]
            await reload(d)
            assert "reloaded " in d.log()
            await sweeps_ran(cluster, 2)
            assert await watchdog_pids(cluster) == [pid]
            assert await lock_holder(cluster) == pid
        # The sweeps still act, on the same connection.
        await killed(cluster, tmp_path / "audit.jsonl")
        assert await watchdog_pids(cluster) == [pid]
        assert d.stop() == 0
    log = d.log()
    clean(log)
    assert log.count("main: connected to") == 1, log
    assert "released the leader lock" not in log


async def test_new_dsn_is_in_before_the_old_connection_closes(
    cluster: TempCluster, tmp_path: Path
) -> None:
    cfg = policy(tmp_path / "p.yaml", cluster)
    with Daemon(cfg) as d:
        old = await leader(cluster)
        policy(cfg, cluster, dsn=cluster.dsn("watchdog") + "?connect_timeout=7")
        await reload(d)
        new = await leader(cluster)
        assert new != old
        assert "the previous connection closed after the new one was in" in d.log()
        await killed(cluster, tmp_path / "audit.jsonl")
        assert d.stop() == 0
    clean(d.log())


@pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
async def test_new_dsn_to_a_full_server_keeps_the_old_connection(
    major: int, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    # 8 slots, 3 reserved for superusers (and none for pg_use_reserved_connections): 5 ordinary.
    c = make_cluster(major, max_connections=8)
    setup_roles(c)
    cfg = policy(tmp_path / "p.yaml", c)
    fillers: list[asyncpg.Connection] = []
    with Daemon(cfg) as d:
        pid = await leader(c)
        while True:  # every ordinary slot taken, by sessions the policy spares
            try:
                fillers.append(await connect(c, "app", application_name="psql"))
            except asyncpg.TooManyConnectionsError:
                break
        policy(cfg, c, dsn=c.dsn("watchdog") + "?connect_timeout=7")
        await reload(d)
        log = d.log()
        [line] = [x for x in log.splitlines() if "the reload keeps the connection" in x]
        assert "(the new dsn is used when it reconnects)" in line, line
        assert await watchdog_pids(c) == [pid]
        assert await lock_holder(c) == pid
        fillers.pop().terminate()
        await killed(c, tmp_path / "audit.jsonl")  # the old connection still acts
        assert await watchdog_pids(c) == [pid]
        # Room again: the same file reloaded gets the new DSN in, then lets the old one go.
        while fillers:
            await fillers.pop().close()
        await reload(d)
        assert "the previous connection closed after the new one was in" in d.log()
        assert await leader(c) != pid
        assert d.stop() == 0
    for f in fillers:
        f.terminate()
    clean(d.log())


async def test_reload_waits_for_the_sweep_in_flight(cluster: TempCluster, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    cfg = policy(tmp_path / "p.yaml", cluster)
    secret = tmp_path / "pw"
    secret.write_text(cluster.password + "\n")
    with NotifyListener() as listener, Daemon(cfg, listener.environ()) as d:
        await listener.expect("READY", timeout=30)
        pid = await leader(cluster)
        async with sweeps_held_up(cluster, pid):
            # A change that needs the runner between two sweeps: poolers and password_file.
            policy(cfg, cluster, interval="2s", pooler=True, password_file=secret)
            d.proc.send_signal(signal.SIGHUP)
            await listener.expect("RELOADING", timeout=10)
            await asyncio.sleep(0.5)  # the reload has parsed the file and waits for the sweep
            assert "reloaded " not in d.log()
        await listener.expect("READY", timeout=30)
        assert "reloaded " in d.log()
        await sweeps_ran(cluster, 2)
        assert await watchdog_pids(cluster) == [pid]
        assert await lock_holder(cluster) == pid
        await killed(cluster, audit)
        assert d.stop() == 0
    clean(d.log())
    assert all(r["outcome"] == "terminated" for r in audit_records(audit))


async def test_target_removed_while_its_sweep_runs(cluster: TempCluster, tmp_path: Path) -> None:
    port = free_port()
    metrics = f"metrics: {{listen: '127.0.0.1:{port}'}}"
    cfg = policy(tmp_path / "p.yaml", cluster, extra=metrics)
    with Daemon(cfg) as d:
        pid = await leader(cluster)
        async with sweeps_held_up(cluster, pid):
            policy(cfg, cluster, targets=("other",), extra=metrics)
            d.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reloaded " in d.log(), timeout=30, what="the reload")
        # The removed target's connection closed, so the lock went to the new one's.
        other = await leader(cluster)
        assert other != pid
        await sweeps_ran(cluster, 3)
        text = await asyncio.to_thread(scrape, port)
        assert 'target="other"' in text
        assert 'target="main"' not in text, [x for x in text.splitlines() if '"main"' in x]
        assert d.stop() == 0
    clean(d.log())


async def test_retired_audit_log_is_closed_with_its_journal(
    cluster: TempCluster, tmp_path: Path
) -> None:
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    cfg = policy(tmp_path / "p.yaml", cluster, audit=old)
    with Daemon(cfg) as d:
        await leader(cluster)
        await killed(cluster, old)  # its journal is made, and held open (flocked)

        def held_open(audit: Path) -> list[str]:
            fds = Path(f"/proc/{d.pid}/fd")
            links = [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()]
            return [x for x in links if x.startswith(f"{audit}.intents")]

        assert held_open(old)
        policy(cfg, cluster, audit=new)
        await reload(d)
        await killed(cluster, new)
        await sweeps_ran(cluster, 2)
        assert held_open(old) == []
        assert held_open(new)
        assert d.stop() == 0
    assert list(journals(old)) == []
    clean(d.log())
