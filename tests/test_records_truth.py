"""No record claims what did not happen: interrupted sweeps and journals being created.

Each window is reached deterministically: by holding a lock (a PostgreSQL table lock, the
audit log's flock), by what /proc shows (a process waiting on a flock, a signal pending on
a stopped backend) and by pg_stat_activity (the statement the watchdog runs now), never
by sleeping and hoping. Real server, real `pg-watchdog once` processes.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import connect, wait_for
from scenario import BIN, cli_env, idle_app_session, is_alive, policy_file, read_audit

from watchdog.audit.journal import journal_dir, journals
from watchdog.audit.log import AuditLog
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.pg import queries


def _intent(pid: int, sweep: str) -> dict[str, Any]:
    return {"ts": "2026-01-01T00:00:00.000Z", "target": "main", "policy": "idle",
            "action": "terminate", "dry_run": False, "outcome": "intent", "pid": pid,
            "backend_start": "2026-01-01T00:00:00.000Z", "usename": "app", "sweep": sweep}


async def _once(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(BIN), "once", "-c", str(config), env=cli_env(), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _finish(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def _waits_on_flock(pid: int, path: Path) -> bool:
    """Whether process `pid` waits for a flock on `path` (/proc/locks lists waiters "->")."""
    ino = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and f[1] == "->" and f[2] == "FLOCK" and int(f[5]) == pid \
                and int(f[6].rsplit(":", 1)[1]) == ino:
            return True
    return False


def _pending(pid: int, sig: int) -> bool:
    """Whether `sig` is pending on process `pid` (sent, not yet handled: it is stopped)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = [int(line.split()[1], 16) for line in status.splitlines()
             if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (sig - 1)) for mask in masks)


async def test_sweep_stopped_before_signalling_records_not_signalled(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """`once` is interrupted (Ctrl-C) while its intents wait on a stuck log write: nothing
    was signalled, and the record says so (`failed`, not signalled), never `unconfirmed`;
    no journal is left for the next start to settle."""
    audit = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path, pg, audit_path=audit, idle="1s")
    quiet = policy_file(tmp_path, pg, audit_path=audit, idle="1h", name="quiet.yaml")
    conns = [await idle_app_session(pg, f"victim-{i}") for i in range(2)]
    pids = {c.get_server_pid() for c in conns}
    await asyncio.sleep(1.2)  # past the 1s threshold
    audit.touch()
    holder = os.open(audit, os.O_RDWR)
    locker = await connect(pg, "postgres", "psql")
    proc = None
    try:
        # Pause `once` on the server, after its start-up recovery and log check.
        await locker.execute("BEGIN; LOCK pg_auth_members IN ACCESS EXCLUSIVE MODE")
        proc = await _once(config)

        async def paused() -> bool:
            return bool(await admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted"
                " AND relation = 'pg_auth_members'::regclass"))

        await wait_for(paused, 15, what="once to wait on the table lock")
        # A dead process's journal its write-ahead must settle first, through the log,
        # which another process holds: the intents wait on the log.
        jdir = journal_dir(audit)
        jdir.mkdir(exist_ok=True)
        (jdir / "1-0badc0de.intent").write_text(json.dumps(_intent(99999, "dead")) + "\n")
        fcntl.flock(holder, fcntl.LOCK_EX)
        await locker.execute("ROLLBACK")
        await wait_for(lambda: _waits_on_flock(proc.pid, audit), 15,
                       what="once's write-ahead to wait on the log")
        proc.send_signal(signal.SIGINT)

        async def disconnected() -> bool:  # the sweep is cancelled: it closed its connection
            return not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-watchdog'")

        await wait_for(disconnected, 15, what="the interrupted sweep to let go of its server")
        fcntl.flock(holder, fcntl.LOCK_UN)  # the intents' write may finish now, too late
        rc, err = await _finish(proc)
        assert rc == 130, err
        assert "Traceback" not in err, err
        for c in conns:
            assert await is_alive(c), "signalled after the interrupt"
        mine = [r for r in read_audit(audit) if r["pid"] in pids]
        assert sorted(r["pid"] for r in mine) == sorted(pids), mine
        assert {(r["outcome"], r["error"]) for r in mine} == {
            ("failed", "not signalled: the sweep stopped before signalling")}, mine
        assert all(p.stat().st_size == 0 for p in journals(audit)), "intents left unsettled"
        # The next start finds nothing of ours to settle.
        res = await _finish(await _once(quiet))
        assert res[0] == 0, res[1]
        again = [r for r in read_audit(audit) if r["pid"] in pids]
        assert again == mine, again
        assert [r["outcome"] for r in read_audit(audit) if r["pid"] == 99999] == ["unconfirmed"]
    finally:
        os.close(holder)
        await locker.close()
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        for c in conns:
            c.terminate()


async def test_interrupted_confirmation_keeps_the_outcomes_already_known(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """`once` is interrupted while it confirms a termination (the victim's backend is
    stopped, so it outlives its SIGTERM): the victim is `unconfirmed`, but the superuser
    session the server refused to signal stays `failed` (permission denied), as known."""
    audit = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path, pg, audit_path=audit, idle="1s",
                         extra={"exclude": {"superusers": False, "member_of": [],
                                            "applications": ["psql"]}})
    victim = await idle_app_session(pg, "victim")
    refused = await idle_app_session(pg, "admin-console", user="postgres")
    vpid, spid = victim.get_server_pid(), refused.get_server_pid()
    await asyncio.sleep(1.2)
    os.kill(vpid, signal.SIGSTOP)
    proc = None
    try:
        proc = await _once(config)
        await wait_for(lambda: _pending(vpid, signal.SIGTERM), 15, what="the SIGTERM")

        async def confirming() -> bool:
            # The confirmation look is sent only after the action's rows were read.
            return bool(await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-watchdog'"
                " AND query = $1", queries.STILL_THERE))

        await wait_for(confirming, 15, interval=0.005, what="once to confirm")
        proc.send_signal(signal.SIGINT)
        rc, err = await _finish(proc)
        assert rc == 130, err
        outcomes = {r["pid"]: (r["outcome"], r["error"]) for r in read_audit(audit)}
        assert outcomes[spid][0] == "failed" and "permission denied" in outcomes[spid][1]
        assert outcomes[vpid][0] == "unconfirmed", outcomes
        assert len(read_audit(audit)) == 2, outcomes
        assert await is_alive(refused)
    finally:
        os.kill(vpid, signal.SIGCONT)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        victim.terminate()
        refused.terminate()


async def test_journal_being_created_is_never_settled_by_another_process(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal between its creation and its lock (`.new-` name, empty, unlocked) is left
    alone by another process's recovery: its creator locks it, writes its intents, names it,
    and may signal."""
    audit_path = tmp_path / "audit.jsonl"
    quiet = policy_file(tmp_path, pg, audit_path=audit_path, idle="1h")
    audit = AuditLog(audit_path)
    real_flock = fcntl.flock
    created, go = threading.Event(), threading.Event()

    def flock(fd: int, operation: int) -> None:
        # The creator pauses right between creating its journal and locking it.
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".new-") \
                and not created.is_set():
            created.set()
            go.wait(30)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            audit.write_intents([_intent(4242, "live")])
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    creator = threading.Thread(target=create)
    creator.start()
    try:
        assert created.wait(15)
        [new] = [p for p in journal_dir(audit_path).iterdir()]
        assert new.name.startswith(".new-") and new.stat().st_size == 0
        settler = await _finish(await _once(quiet))  # another process recovers now
        assert settler[0] == 0, settler[1]
        assert new.exists(), "another process settled a journal being created"
    finally:
        go.set()
        creator.join(30)
    assert not errors, errors
    assert journals(audit_path) == [audit.intent_path]
    assert [json.loads(x)["pid"] for x in audit.intent_path.read_text().splitlines()] == [4242]
    assert read_audit(audit_path) == []
    audit.close()
