"""Faults around the watchdog: the server restarted or gone for long, the audit log unwritable
or full, the watchdog SIGKILLed mid-sweep, a torn audit line. Real servers, real processes.

What must hold through all of them: no kill without its audit record, no record claiming a
kill that did not happen, nothing signalled while its record cannot be written, and the
watchdog keeps working once the fault is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import resource
import signal
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import pytest
from conftest import MAJORS
from daemon import Daemon, write_config
from faults import (
    SIGNALLED,
    CutProxy,
    admin_kills,
    alive,
    by_pid,
    check_log,
    close_all,
    fill,
    journal_bytes,
    journal_size,
    open_victims,
    pids_of,
    poll,
    read_records,
    run_cli,
    size,
    tmpfs,
)
from helpers import connect, sweeps_ran, wait_for
from scenario import setup_roles

from watchdog.audit.journal import journal_dir
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import load_config
from watchdog.core import backoff
from watchdog.service.scheduler import Service

PARAMS = pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
LAST = MAJORS[-1]
MANY = "limits:\n  max_per_sweep: 500\n"


def _cluster(make_cluster, major: int, max_connections: int = 60) -> TempCluster:
    c: TempCluster = make_cluster(major, max_connections=max_connections)
    setup_roles(c)
    # The clusters run with synchronous_commit=off: make the roles survive an immediate stop.
    c.psql("CHECKPOINT")
    return c


async def _all_die(c: TempCluster, pids: list[int], timeout: float = 15) -> None:
    async def gone() -> bool:
        return not await alive(c, pids)

    await wait_for(gone, timeout=timeout, interval=0.1, what=f"{len(pids)} victims to die")


async def _no_watchdog(c: TempCluster) -> bool:
    conn = await connect(c, "postgres", application_name="psql")
    try:
        return not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-watchdog'"
        )
    finally:
        await conn.close()


async def _records_for(audit: Path, pids: list[int], timeout: float = 10) -> None:
    await wait_for(lambda: set(pids) <= set(by_pid(read_records(audit))), timeout=timeout,
                   interval=0.1, what=f"records for {pids}")


def _log_has(c: TempCluster, offset: int, text: bytes) -> bool:
    with c.log_path.open("rb") as f:
        f.seek(offset)
        return text in f.read()


# -- a. server restarted mid-sweep ------------------------------------------------------


@PARAMS
@pytest.mark.parametrize("when", ["intent", "signalled"])
async def test_server_restart_mid_sweep(
    make_cluster, tmp_path: Path, major: int, when: str
) -> None:
    """Immediate shutdown as soon as the sweep's intents are on disk, or as soon as the first
    victim logs its termination; then the server starts again."""
    c = _cluster(make_cluster, major, max_connections=140)
    audit = tmp_path / "audit.jsonl"
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms", extra=MANY)
    victims = await open_victims(c, 100)
    first = pids_of(victims)
    await asyncio.sleep(1.1)  # all due in the daemon's first sweep
    offset = size(c.log_path)
    with Daemon(cfg) as d:
        if when == "intent":
            poll(lambda: journal_size(audit) > 0, 30, "the first sweep's intents")
        else:
            poll(lambda: _log_has(c, offset, b"due to administrator command"), 30,
                 "the first termination", step=0.0005)
        # pg_ctl stop -m immediate is SIGQUIT to the postmaster; sent directly it lands
        # within the sweep. Backends it ends are not logged as terminated by SIGTERM.
        os.kill(c.postmaster_pid(), signal.SIGQUIT)
        poll(lambda: not c.is_running(), 30, "the server to stop", step=0.01)
        c.start()
        # Back within an interval or two ("connected to" again), or after failed attempts.
        await wait_for(lambda: d.log().count("connected to") >= 2, timeout=20, what="reconnect")
        assert d.alive()
        second = await open_victims(c, 3)
        await _all_die(c, pids_of(second))
        await _records_for(audit, pids_of(second))
        assert d.stop() == 0
    close_all(victims + second)

    records = read_records(audit)
    check_log(records)
    outcomes = by_pid(records)
    signalled = admin_kills(c)  # immediate shutdown kills with SIGQUIT: never logged as this
    print("first sweep:", Counter(o for p in first for o in outcomes.get(p, ["(none)"])),
          f"{len(set(first) & signalled)} signalled")
    for pid, outs in outcomes.items():
        if "terminated" in outs:
            assert pid in signalled, f"pid {pid} recorded as terminated but never signalled"
    for pid in signalled:
        # A signalled backend may only be on record as terminated or unconfirmed: a 'failed'
        # record would say the watchdog did not kill it.
        assert set(outcomes.get(pid, [])) & SIGNALLED, (pid, outcomes.get(pid))
    assert all(outcomes[p] == ["terminated"] for p in pids_of(second))
    assert journal_size(audit) == 0


@PARAMS
async def test_network_cut_mid_act_is_not_recorded_as_failed(
    make_cluster, tmp_path: Path, major: int
) -> None:
    """The connection dies after the server received the ACT statement and before its answer
    came back: the server ran it (the victims die), so the records may say 'unconfirmed', or
    'terminated' once confirmed, but never 'failed' (which reads as: not killed)."""
    c = _cluster(make_cluster, major)
    audit = tmp_path / "audit.jsonl"
    victims = await open_victims(c, 5)
    pids = pids_of(victims)
    await asyncio.sleep(1.1)
    async with CutProxy(c.host, c.port, b"pg_terminate_backend(") as proxy:
        cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms")
        cfg.write_text(cfg.read_text().replace(f":{c.port}/", f":{proxy.port}/"))
        with Daemon(cfg) as d:
            await asyncio.wait_for(proxy.cut.wait(), 30)
            await _all_die(c, pids)  # the server ran the statement: all were signalled
            await _records_for(audit, pids)
            later = await open_victims(c, 2)  # and the watchdog carries on
            await _all_die(c, pids_of(later))
            await _records_for(audit, pids_of(later))
            assert d.stop() == 0
    close_all(victims + later)
    records = read_records(audit)
    check_log(records)
    outcomes = by_pid(records)
    print("cut mid-ACT:", {p: outcomes[p] for p in pids})
    assert set(pids) <= admin_kills(c)
    for p in pids:
        assert set(outcomes[p]) <= SIGNALLED, (p, outcomes[p])
    assert all(outcomes[p] == ["terminated"] for p in pids_of(later))


# -- b. server down longer than the backoff cap -------------------------------------------


async def test_long_outage_capped_backoff_with_jitter(
    make_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backoff, "CAP", 2.0)
    caplog.set_level(logging.INFO, logger="watchdog")
    c = _cluster(make_cluster, LAST)
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms")
    svc = Service(load_config(str(cfg)), str(cfg), dry_run=False)
    task = asyncio.create_task(svc.run())

    def attempts() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "next attempt in" in r.getMessage()]

    try:
        await wait_for(lambda: svc.runners["main"].up, timeout=20, what="connected")
        c.stop("fast")
        await wait_for(lambda: len(attempts()) >= 5, timeout=20, what="5 reconnect attempts")
        c.start()
        await wait_for(lambda: any("reconnected" in r.getMessage() for r in caplog.records),
                       timeout=10, what="reconnect")
        victims = await open_victims(c, 2)
        await _all_die(c, pids_of(victims), timeout=10)
        close_all(victims)
    finally:
        svc.stop.set()
        assert await asyncio.wait_for(task, 30) == 0

    recs = attempts()
    delays = [float(re.search(r"next attempt in ([\d.]+)s", r.getMessage())[1]) for r in recs]
    print("next attempt in:", delays)
    for i, d in enumerate(delays, 1):
        upper = min(2.0, backoff.BASE * 2**i)
        assert upper / 2 - 0.1 <= d <= upper + 0.05, (i, d, delays)  # full jitter in [u/2, u]
    assert max(delays[:1]) <= 1.05 < max(delays), delays  # grows, then capped
    assert len(set(delays)) > 1, delays  # jittered
    # Each attempt waited out the announced delay, and came within an interval of it.
    for prev, nxt, d in zip(recs, recs[1:], delays, strict=False):
        gap = nxt.created - prev.created
        assert d - 0.05 <= gap, (gap, d)  # never early; how late is load, not behaviour
    assert all(r["outcome"] == "terminated" for r in read_records(tmp_path / "audit.jsonl"))


# -- c. audit log unwritable or full -------------------------------------------------------


@PARAMS
async def test_audit_file_unwritable_holds_back_records_and_fails_closed(
    make_cluster, tmp_path: Path, major: int
) -> None:
    """The final append fails (EISDIR) after the signals: those records wait in memory and
    nothing more is signalled until they are written."""
    c = _cluster(make_cluster, major)
    audit = tmp_path / "audit.jsonl"
    away = tmp_path / "audit.jsonl.away"
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms")
    with Daemon(cfg) as d:
        v0 = await open_victims(c, 1)
        await _all_die(c, pids_of(v0))
        await _records_for(audit, pids_of(v0))

        audit.rename(away)
        audit.mkdir()  # opening the log now fails with EISDIR; the intent journal still works
        held = await open_victims(c, 3)
        await _all_die(c, pids_of(held))  # intents were on disk: these went out
        await wait_for(lambda: "cannot write audit log" in d.log(), timeout=30, what="error")
        assert journal_size(audit) > 0  # the journal keeps them while their records wait

        blocked = await open_victims(c, 2)
        await asyncio.sleep(1.0)  # due
        await sweeps_ran(c, 4)
        assert await alive(c, pids_of(blocked)) == set(pids_of(blocked)), "signalled blind"
        assert d.alive()

        audit.rmdir()
        away.rename(audit)
        await _all_die(c, pids_of(blocked))
        await _records_for(audit, pids_of(held + blocked))
        assert d.stop() == 0
    close_all(v0 + held + blocked)
    records = read_records(audit)
    check_log(records)
    outcomes = by_pid(records)
    assert all(outcomes[p] == ["terminated"] for p in pids_of(v0 + held + blocked)), outcomes
    assert journal_size(audit) == 0
    assert "nothing will be signalled until it can be written" in d.log()


@PARAMS
async def test_audit_dir_unwritable_signals_nothing(
    make_cluster, tmp_path: Path, major: int
) -> None:
    """The audit directory replaced by a regular file (ENOTDIR): not even the intent can be
    written, so nothing is signalled; the journal left behind stays consistent."""
    c = _cluster(make_cluster, major)
    logdir = tmp_path / "log"
    logdir.mkdir()
    away = tmp_path / "log.away"
    audit = logdir / "audit.jsonl"
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms", audit=audit)
    with Daemon(cfg) as d:
        v0 = await open_victims(c, 1)
        await _all_die(c, pids_of(v0))
        await _records_for(audit, pids_of(v0))

        logdir.rename(away)
        logdir.write_text("not a directory\n")
        victims = await open_victims(c, 3)
        await asyncio.sleep(1.0)  # due
        await sweeps_ran(c, 4)
        assert await alive(c, pids_of(victims)) == set(pids_of(victims)), "signalled blind"
        assert "cannot write audit log" in d.log() or "cannot read" in d.log(), d.log()
        assert journal_size(away / "audit.jsonl") == 0  # no half-written intents behind
        assert d.alive()

        logdir.unlink()
        away.rename(logdir)
        await _all_die(c, pids_of(victims))
        await _records_for(audit, pids_of(victims))
        assert d.stop() == 0
    close_all(v0 + victims)
    records = read_records(audit)
    check_log(records)
    outcomes = by_pid(records)
    assert all(outcomes[p] == ["terminated"] for p in pids_of(v0 + victims)), outcomes
    assert journal_size(audit) == 0


def _replace_with_a_directory(audit: Path) -> None:
    audit.rename(audit.with_name("audit.jsonl.away"))
    audit.mkdir()


async def _kills_with_records_held_back(
    d: Daemon, c: TempCluster, audit: Path
) -> list[asyncpg.Connection]:
    """With the audit log replaced by a directory, two victims die (their intents reached the
    journal) and their final records are held back; the log stays unwritable."""
    await wait_for(lambda: "connected to" in d.log(), timeout=20, what="connected")
    _replace_with_a_directory(audit)
    held = await open_victims(c, 2)
    await _all_die(c, pids_of(held))
    await wait_for(lambda: "cannot write audit log" in d.log(), timeout=30, what="error")
    return held


async def test_held_back_records_written_without_waiting_for_another_kill(
    make_cluster, tmp_path: Path
) -> None:
    """Records held back by a failed append reach the disk once it is writable again, even
    if no session is due by then (not only at the next action, nor lost at shutdown)."""
    c = _cluster(make_cluster, LAST)
    audit = tmp_path / "audit.jsonl"
    away = tmp_path / "audit.jsonl.away"
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms")
    with Daemon(cfg) as d:
        held = await _kills_with_records_held_back(d, c, audit)
        audit.rmdir()
        away.rename(audit)
        await _records_for(audit, pids_of(held), timeout=5)
        assert d.stop() == 0
    close_all(held)
    check_log(read_records(audit))
    assert all(o == ["terminated"] for o in by_pid(read_records(audit)).values())


async def test_stopped_while_records_held_back_leaves_them_recoverable(
    make_cluster, tmp_path: Path
) -> None:
    """SIGTERM while the log is unwritable: the intent journal still holds the actions, and
    the next start records them (unconfirmed at worst), once, before acting again."""
    c = _cluster(make_cluster, LAST)
    audit = tmp_path / "audit.jsonl"
    away = tmp_path / "audit.jsonl.away"
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms")
    with Daemon(cfg) as d:
        held = await _kills_with_records_held_back(d, c, audit)
        assert d.stop() == 0
    audit.rmdir()
    away.rename(audit)
    res = run_cli("once", "-c", cfg)
    assert res.returncode == 0, res.stderr
    records = read_records(audit)
    check_log(records)
    outcomes = by_pid(records)
    for p in pids_of(held):  # once each, as signalled (unconfirmed: the outcome was lost)
        assert len(outcomes.get(p, [])) == 1 and set(outcomes[p]) <= SIGNALLED, (p, outcomes)
    close_all(held)


@PARAMS
async def test_audit_disk_full_fails_closed(make_cluster, tmp_path: Path, major: int) -> None:
    """A full file system (64 kB tmpfs): nothing signalled while the intent cannot be
    written; once there is room again the watchdog acts and records."""
    mnt = tmp_path / "mnt"
    with tmpfs(mnt, 64 * 1024) as mounted:
        # CI runs as root, where mounting works: a missing tmpfs is a broken machine, not a skip.
        assert mounted, "mount -t tmpfs failed (this test needs root)"
        c = _cluster(make_cluster, major)
        audit = mnt / "audit.jsonl"
        cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms", audit=audit)
        with Daemon(cfg) as d:
            v0 = await open_victims(c, 1)
            await _all_die(c, pids_of(v0))
            await _records_for(audit, pids_of(v0))
            before = audit.read_bytes()

            filler = fill(mnt)
            victims = await open_victims(c, 3)
            await asyncio.sleep(1.0)  # due
            await sweeps_ran(c, 4)
            assert await alive(c, pids_of(victims)) == set(pids_of(victims)), "signalled blind"
            assert "No space left on device" in d.log(), d.log()
            assert audit.read_bytes().startswith(before)
            assert d.alive()

            filler.unlink()
            await _all_die(c, pids_of(victims))
            await _records_for(audit, pids_of(victims))
            assert d.stop() == 0
        close_all(v0 + victims)
        records = read_records(audit)
        check_log(records)
        assert all(by_pid(records)[p] == ["terminated"] for p in pids_of(v0 + victims))
        assert not [line for line in audit.read_bytes().splitlines() if line.strip()
                    and not line.startswith(b"{")], "a torn or partial line was left behind"
        assert journal_size(audit) == 0


async def test_file_size_limit_mid_append_leaves_no_duplicates(
    make_cluster, tmp_path: Path
) -> None:
    """RLIMIT_FSIZE lowered on the running daemon so the final append is cut short after
    the signals went out (EFBIG; Python ignores SIGXFSZ): once the limit is lifted the held
    records are written exactly once, and no partial record stays in the log."""
    c = _cluster(make_cluster, LAST)
    audit = tmp_path / "audit.jsonl"
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms")
    # An audit log already bigger than the daemon's stderr log and any intent journal, so
    # only the audit append can hit the limit.
    audit.write_bytes(b"\n" * 65536)
    with Daemon(cfg) as d:
        v0 = await open_victims(c, 1)
        await _all_die(c, pids_of(v0))
        await _records_for(audit, pids_of(v0))
        record_len = len(audit.read_bytes().splitlines()[-1]) + 1
        # Room for one more record and half of the next.
        limit = size(audit) + record_len + record_len // 2
        resource.prlimit(d.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            held = await open_victims(c, 3)
            await _all_die(c, pids_of(held))
            await wait_for(lambda: "File too large" in d.log(), timeout=30, what="EFBIG")
        finally:
            resource.prlimit(d.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        after = await open_victims(c, 1)  # the next action flushes the held records first
        await _all_die(c, pids_of(after))
        await _records_for(audit, pids_of(held + after))
        assert d.stop() == 0
    close_all(v0 + held + after)
    records = read_records(audit)
    check_log(records)  # no (sweep, pid) twice
    outcomes = by_pid(records)
    assert all(outcomes[p] == ["terminated"] for p in pids_of(v0 + held + after)), outcomes
    partial = [line for line in audit.read_bytes().splitlines() if line.strip()
               and not line.endswith(b"}")]
    assert not partial, f"partial records left in the log: {partial}"


# -- d. SIGKILL of the watchdog mid-sweep --------------------------------------------------


@PARAMS
@pytest.mark.parametrize("when", ["intent", "signalled"])
async def test_sigkill_mid_sweep_every_kill_recorded_once(
    make_cluster, tmp_path: Path, major: int, when: str
) -> None:
    """SIGKILL the watchdog as soon as the sweep's intents are on disk (before any signal),
    or as soon as the first victim logs its termination (signals out, nothing recorded)."""
    c = _cluster(make_cluster, major, max_connections=240)
    audit = tmp_path / "audit.jsonl"
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="250ms", extra=MANY)
    victims = await open_victims(c, 200)
    pids = pids_of(victims)
    await asyncio.sleep(1.1)
    offset = size(c.log_path)
    with Daemon(cfg) as d:
        if when == "intent":
            poll(lambda: journal_size(audit) > 0, 30, "the intent journal")
        else:
            poll(lambda: _log_has(c, offset, b"due to administrator command"), 30,
                 "the first termination", step=0.0005)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
    journal = journal_bytes(audit)
    # The server finishes the ACT statement on its own; wait until the watchdog's backend
    # is gone, and the backends it signalled have exited.
    await wait_for(lambda: _no_watchdog(c), timeout=10, what="the watchdog's backend to go")
    await asyncio.sleep(0.5)
    survivors = await alive(c, pids)
    killed = set(pids) - survivors
    print(f"killed mid-sweep: {len(killed)} of {len(pids)} signalled before the SIGKILL; "
          f"journal {len(journal)} bytes; records before recovery: "
          f"{len(read_records(audit))}")
    assert journal, "the SIGKILL came after the sweep had settled its journal: too late"

    # The next start (here `once` with a policy that acts on nothing) settles the journal.
    quiet = write_config(tmp_path / "q.yaml", c, idle="1h", interval="250ms", audit=audit)
    res = run_cli("once", "-c", quiet)
    assert res.returncode == 0, res.stderr
    records = read_records(audit)
    check_log(records)
    outcomes = by_pid(records)
    missing = [p for p in killed if not set(outcomes.get(p, [])) & SIGNALLED]
    assert not missing, f"{len(missing)} killed backends without a record: {missing[:5]}"
    assert killed <= admin_kills(c)
    for p in survivors:  # left alive: unconfirmed at worst, never terminated
        assert "terminated" not in outcomes.get(p, []), p
    sweeps = {r["sweep"] for r in records}
    assert len(sweeps) == 1, sweeps
    assert journal_size(audit) == 0
    # A second recovery finds nothing to do: no duplicates.
    assert run_cli("once", "-c", quiet).returncode == 0
    assert len(read_records(audit)) == len(records)
    close_all(victims)


# -- e. a torn audit line ------------------------------------------------------------------


async def test_torn_line_tolerated_and_next_record_on_fresh_line(
    make_cluster, tmp_path: Path
) -> None:
    c = _cluster(make_cluster, LAST)
    audit = tmp_path / "audit.jsonl"
    cfg = write_config(tmp_path / "p.yaml", c, idle="500ms", interval="250ms")
    first = await open_victims(c, 2)
    await asyncio.sleep(0.6)
    assert run_cli("once", "-c", cfg).returncode == 0
    assert set(by_pid(read_records(audit))) == set(pids_of(first))
    # A crash in the middle of the next write: half a record, no newline.
    line = audit.read_bytes().splitlines()[-1]
    with audit.open("ab") as f:
        f.write(line[: len(line) // 2])
    torn = audit.read_bytes()

    res = run_cli("audit", "--file", audit, "--json")
    assert res.returncode == 0, res.stderr
    assert len([json.loads(x) for x in res.stdout.splitlines() if x.strip()]) == 2
    assert "Traceback" not in res.stderr
    assert run_cli("audit", "--file", audit).returncode == 0
    assert run_cli("audit", "--file", audit, "--summary").returncode == 0

    # A torn intent journal too (the crash hit both): its complete lines are recovered.
    intent = journal_dir(audit) / "4242-0badc0de.intent"
    intent.parent.mkdir(exist_ok=True)
    rec = json.loads(line) | {"outcome": "intent", "sweep": uuid.uuid4().hex[:16], "pid": 4242}
    whole = json.dumps(rec).encode() + b"\n"
    intent.write_bytes(whole + whole[: len(whole) // 3])

    second = await open_victims(c, 1)
    await asyncio.sleep(0.6)
    res = run_cli("once", "-c", cfg)
    assert res.returncode == 0, res.stderr
    data = audit.read_bytes()
    assert data.startswith(torn)
    rest = data[len(torn):]
    assert rest.startswith(b"\n"), "the next record did not start on a fresh line"
    new = [json.loads(x) for x in rest.splitlines() if x.strip()]
    assert [r["outcome"] for r in new if r["pid"] == 4242] == ["unconfirmed"]
    assert [r["outcome"] for r in new if r["pid"] in pids_of(second)] == ["terminated"]
    assert data.endswith(b"\n")
    res = run_cli("audit", "--file", audit, "--json")
    assert res.returncode == 0, res.stderr
    assert len([x for x in res.stdout.splitlines() if x.strip()]) == 4
    assert journal_size(audit) == 0
    close_all(first + second)
