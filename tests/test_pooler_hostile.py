"""A broken or hostile PgBouncer console costs one pooler error, never a sweep, never the host.

The console is tests/pgwire.py's FakeConsole, a real process speaking the wire protocol on
127.0.0.7: wrong column types, rows without end, a row cut in half, one row announced as
1 GB, 150,000 rows. The victims are real backends of role app on the module's PostgreSQL
(from 127.0.0.1, so not from the pooler's address): `once` and `run` kill them all the same,
and the watchdog's peak memory (the kernel's own figure) stays under MEMORY_BOUND_MB.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import yaml
from daemon import Daemon, backend_alive
from helpers import connect, wait_for
from pgwire import fake_console, queries_seen
from scenario import (
    APP_ROLE,
    cli_env,
    kill_leftovers,
    policy_file,
    read_audit,
    run_cli,
    setup_roles,
)
from sentry_endpoint import SentryEndpoint

from watchdog.commands.demo.tempcluster import TempCluster

MakeCluster = Callable[..., TempCluster]

# `once` and `run` take 45-60 MB here, with or without a pooler; on main a console streaming
# rows took one `once` to 948 MB in 2 s. Every answer is capped (watchdog.pgbouncer.read): at
# max_client_conn 200, 1,000 rows and 1 MB.
MEMORY_BOUND_MB = 100
# A console claiming max_client_conn 100,000 gets the largest caps: 200,000 rows (about 70 MB
# once parsed) and 64 MB on the wire, which libpq may hold at once for one announced row.
HUGE_BOUND_MB = 200
ERRORS = {
    "endless": "passes 1000 rows",
    "hang": "timed out",
    "missing": "lacks remote_pid",
    "giant": "passes 1024000 bytes",
}


@pytest.fixture
def roles(pg: TempCluster) -> Iterator[TempCluster]:
    setup_roles(pg)
    kill_leftovers(pg)
    yield pg
    kill_leftovers(pg)


@pytest.fixture
async def victims(roles: TempCluster) -> AsyncIterator[list[asyncpg.Connection]]:
    """Three idle sessions of role app, past the 1 s idle policy by the time they are used."""
    conns = [await connect(roles, APP_ROLE, "leaky") for _ in range(3)]
    try:
        yield conns
    finally:
        for c in conns:
            if not c.is_closed():
                c.terminate()


async def pids_of(conns: list[asyncpg.Connection]) -> list[int]:
    return [int(c.get_server_pid()) for c in conns]


def with_pooler(path: Path, port: int) -> Path:
    """The policy file at ``path`` with the fake console as pooler; its policies act on role
    app only (a session of another role past a threshold is a candidate, never a victim)."""
    doc = yaml.safe_load(path.read_text())
    doc["targets"][0]["poolers"] = [
        {"name": "fake", "dsn": f"postgresql://watchdog@127.0.0.7:{port}/pgbouncer"}]
    for policy in doc["policies"]:
        policy["users"] = [APP_ROLE]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def peak_mb(pid: int) -> float:
    """VmHWM of a live process: the most resident memory it has held, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


# `pg-watchdog once`, reporting its own peak resident memory as it exits. Not wait4's
# ru_maxrss: Linux carries the parent's high-water mark across fork and exec into it, so a
# child of this (large) test process would report the test's size, not its own.
_ONCE_WITH_PEAK = """
import atexit, sys
def peak():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(f"peak-kb {kb}", file=sys.stderr)
atexit.register(peak)
from watchdog.commands.cli import main
sys.exit(main(sys.argv[1:]))
"""


def once_with_peak(path: Path) -> tuple[int, str, float, float]:
    """Run `pg-watchdog once`: (exit code, stderr, peak resident MB, seconds)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _ONCE_WITH_PEAK, "once", "-c", str(path)],
                          env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          check=False)
    err = proc.stderr.decode()
    peaks = [int(line.split()[1]) for line in err.splitlines() if line.startswith("peak-kb ")]
    assert len(peaks) == 1, err
    rest = "".join(line + "\n" for line in err.splitlines() if not line.startswith("peak-kb "))
    return proc.returncode, rest, peaks[0] / 1024, time.monotonic() - started


@pytest.mark.parametrize(("mode", "limit"), [
    ("wrong-types", 200), ("endless", 200), ("hang", 200), ("missing", 200), ("giant", 200),
    # A console claiming a huge max_client_conn gets the largest caps: 200,000 rows, 64 MB.
    ("giant", 100_000),
])
async def test_once_kills_its_victims_whatever_the_console_answers(
    roles: TempCluster, victims: list[asyncpg.Connection], tmp_path: Path, mode: str, limit: int
) -> None:
    pids = await pids_of(victims)
    with fake_console(tmp_path, mode, max_client_conn=limit) as (port, log, _):
        path = with_pooler(policy_file(tmp_path, roles, idle="1s"), port)
        await asyncio.sleep(1.2)  # the victims pass the 1 s idle policy
        rc, err, peak, took = await asyncio.to_thread(once_with_peak, path)
        assert queries_seen(log, "SHOW SOCKETS") == 1, log.read_text()
    assert rc == 0, err  # a pooler's trouble is not the target's
    assert "Traceback" not in err, err
    killed = {r["pid"] for r in read_audit(tmp_path / "audit.jsonl")
              if r["outcome"] == "terminated"}
    assert killed == set(pids), err
    if mode == "wrong-types":
        assert "rows of its answer did not fit and were dropped" in err, err
    elif limit == 200:
        assert f"pooler fake: answer to SHOW SOCKETS {ERRORS[mode]}" in err or (
            mode == "hang" and "main: pooler fake: timed out" in err), err
    assert peak < (MEMORY_BOUND_MB if limit == 200 else HUGE_BOUND_MB), f"peak {peak:.0f} MB"
    assert took < 20, f"once took {took:.1f}s"


async def test_run_keeps_its_connection_and_lock_and_alerts_once(
    roles: TempCluster, tmp_path: Path
) -> None:
    """An endless console, read again and again by `run`: one pooler event, the server's
    connection and the leader lock kept, victims killed, memory bounded."""
    with SentryEndpoint() as sentry, fake_console(tmp_path, "endless") as (port, log, _):
        path = with_pooler(policy_file(tmp_path, roles, idle="1s", interval="1s", extra={
            "alerts": {"sentry": {"dsn": sentry.dsn, "environment": "test"}}}), port)
        # Role watchdog, not in any policy's users but past the idle threshold: a candidate
        # on every sweep, so the console is read again each time its backoff allows.
        bystander = await connect(roles, "watchdog", "bystander")
        try:
            with Daemon(path) as daemon:
                await wait_for(lambda: queries_seen(log, "SHOW SOCKETS") >= 1, 30, interval=0.1,
                               what=f"a first read ({daemon.log()})")
                held = await watchdog_backends(roles)
                for _ in range(2):  # two rounds of victims, each killed while the console fails
                    conns = [await connect(roles, APP_ROLE, "leaky") for _ in range(3)]
                    pids = await pids_of(conns)

                    async def gone(pids: list[int] = pids) -> bool:
                        return not any([await backend_alive(roles, p) for p in pids])

                    await wait_for(gone, 30, interval=0.1, what=f"victims killed {daemon.log()}")
                await wait_for(lambda: queries_seen(log, "SHOW SOCKETS") >= 4, 60, interval=0.2,
                               what="four reads of the endless console")
                peak = peak_mb(daemon.pid)
                assert await watchdog_backends(roles) == held, daemon.log()
                assert "released the leader lock" not in daemon.log()
                assert daemon.stop() == 0
        finally:
            await bystander.close()
        pooler_events = [e for e in sentry.events() if e.get("tags", {}).get("kind") == "pooler"]
    assert len(pooler_events) == 1, [e.get("message") for e in sentry.events()]
    assert "spared until it answers" in pooler_events[0]["message"]
    assert peak < MEMORY_BOUND_MB, f"peak {peak:.0f} MB"


async def watchdog_backends(pg: TempCluster) -> set[int]:
    """The pids of pg-watchdog's own sessions (its held connection)."""
    conn = await connect(pg, "postgres", "psql")
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity"
                                " WHERE application_name = 'pg-watchdog'")
    finally:
        await conn.close()
    return {r["pid"] for r in rows}


async def test_a_huge_answer_does_not_stall_the_other_targets(
    roles: TempCluster, make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """150,000 rows from target a's pooler, parsed off the event loop: target b's victims die."""
    other = make_cluster(roles.major)
    setup_roles(other)
    with fake_console(tmp_path, "huge", max_client_conn=100_000, rows=150_000) as (port, log, _):
        path = policy_file(tmp_path, roles, idle="1s", interval="1s")
        doc = yaml.safe_load(path.read_text())
        doc["targets"] = [
            {**doc["targets"][0], "name": "a", "poolers": [
                {"name": "fake", "dsn": f"postgresql://watchdog@127.0.0.7:{port}/pgbouncer"}]},
            {**doc["targets"][0], "name": "b", "dsn": other.dsn("watchdog")},
        ]
        # a only reads its pooler (its idle sessions are candidates, no user of its policy);
        # b kills the idle sessions of role app.
        doc["policies"] = [
            {"name": "a-watch", "state": "idle", "longer_than": "1s", "users": ["nobody"],
             "targets": ["a"]},
            {"name": "b-idle", "state": "idle", "longer_than": "1s", "users": [APP_ROLE],
             "targets": ["b"]},
        ]
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        bystander = await connect(roles, "watchdog", "bystander")
        try:
            with Daemon(path) as daemon:
                await wait_for(lambda: queries_seen(log, "SHOW SOCKETS") >= 1, 30, interval=0.1,
                               what=f"a first read ({daemon.log()})")
                conns = [await connect(other, APP_ROLE, "leaky") for _ in range(3)]
                pids = await pids_of(conns)

                async def gone() -> bool:
                    return not any([await backend_alive(other, p) for p in pids])

                await wait_for(gone, 30, interval=0.1, what=f"b's victims killed {daemon.log()}")
                await wait_for(lambda: queries_seen(log, "SHOW SOCKETS") >= 2, 60, interval=0.2,
                               what="a second read of the huge answer")
                peak = peak_mb(daemon.pid)
                assert daemon.stop() == 0
        finally:
            await bystander.close()
    records = read_audit(tmp_path / "audit.jsonl")
    assert {r["pid"] for r in records if r["target"] == "b"} == set(pids)
    assert peak < HUGE_BOUND_MB, f"peak {peak:.0f} MB"


async def test_check_connect_names_an_answer_that_does_not_fit(
    roles: TempCluster, tmp_path: Path
) -> None:
    with fake_console(tmp_path, "missing") as (port, _, _):
        path = with_pooler(policy_file(tmp_path, roles), port)
        result = await run_cli("check", "--connect", "-c", path)
    assert result.rc == 1, result
    assert any(line.strip() == "FAIL  pooler fake: connected, but answer to SHOW SOCKETS lacks"
               " remote_pid" for line in result.stdout.splitlines()), result.stdout
