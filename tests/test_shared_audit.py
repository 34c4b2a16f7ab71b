"""Several pg-watchdog processes on one host sharing one audit path.

Each signal gets exactly one final record, no record contradicts another, recovery settles
only dead processes' intents, and a rotated or large log never brings settled intents back.
Real servers, real processes; the server's own log says which backends were signalled.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import pwd
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import MAJORS
from daemon import Daemon, write_config
from faults import (
    SIGNALLED,
    admin_kills,
    alive,
    by_pid,
    check_log,
    close_all,
    journal_size,
    open_victims,
    pids_of,
    read_records,
    run_cli,
)
from helpers import connect, wait_for
from scenario import setup_roles

from watchdog.audit.log import AuditLog
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import LEADER_KEY
from watchdog.pg import queries

PARAMS = pytest.mark.parametrize("major", MAJORS, ids=[f"pg{m}" for m in MAJORS])
SOAK_SECONDS = 25


def _cluster(make_cluster, major: int) -> TempCluster:
    c: TempCluster = make_cluster(major, max_connections=80)
    setup_roles(c)
    c.psql("CHECKPOINT")
    return c


def _all_records(audit: Path) -> list[dict[str, Any]]:
    """Every record of the log and its rotated files, through `pg-watchdog audit`."""
    res = run_cli("audit", "--file", audit, "--json")
    assert res.returncode == 0, res.stderr
    return [json.loads(x) for x in res.stdout.splitlines() if x.strip()]


# -- run acting while once / once --dry-run / status / audit loop on the same file ------------


@PARAMS
async def test_processes_sharing_an_audit_path_one_final_record_per_signal(
    make_cluster, tmp_path: Path, major: int
) -> None:
    c = _cluster(make_cluster, major)
    audit = tmp_path / "audit.jsonl"
    cfg = write_config(tmp_path / "p.yaml", c, idle="1s", interval="1s")
    victims: list[Any] = []
    stop = asyncio.Event()
    runs: Counter[str] = Counter()
    outputs: list[str] = []

    async def stream() -> None:  # a new victim every 200 ms
        while not stop.is_set():
            victims.extend(await open_victims(c, 1))
            await asyncio.sleep(0.2)

    async def loop(*args: str) -> None:
        while not stop.is_set():
            res = await asyncio.to_thread(run_cli, *args, "-c", cfg)
            assert res.returncode == 0, (args, res.stdout, res.stderr)
            assert "Traceback" not in res.stderr, res.stderr
            runs[" ".join(args)] += 1
            outputs.append(res.stdout)

    with Daemon(cfg) as d:
        await wait_for(lambda: "connected to" in d.log(), timeout=60, what="run to connect")
        tasks = [asyncio.create_task(t) for t in (
            stream(), loop("once", "--dry-run"), loop("once"), loop("once"), loop("status"),
            loop("audit"))]
        def enough() -> bool:  # what the assertions below need to prove anything
            return (runs["once"] >= 4 and runs["once --dry-run"] >= 2 and runs["status"] >= 2
                    and len(victims) >= 30)

        try:
            await asyncio.sleep(SOAK_SECONDS)
            # A loaded machine fits fewer runs into the soak: go on until there are enough.
            await wait_for(enough, timeout=60, interval=0.5, what="enough runs and victims")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        pids = pids_of(victims)

        async def settled() -> bool:
            return not await alive(c, pids) and set(pids) <= set(by_pid(
                r for r in read_records(audit) if not r["dry_run"]))

        await wait_for(settled, timeout=30, what="every victim dead and on record")
        assert d.stop() == 0, d.log()
    close_all(victims)

    records = read_records(audit)
    check_log(records)
    live = by_pid(r for r in records if not r["dry_run"])
    signalled = admin_kills(c) & set(pids)
    print(f"{len(pids)} victims, {len(signalled)} signalled, {len(records)} records; runs: "
          f"{dict(runs)}; dry-run records: {sum(r['dry_run'] for r in records)}")
    assert runs["once"] >= 4 and runs["once --dry-run"] >= 2 and runs["status"] >= 2, runs
    assert len(signalled) >= 20, "too few kills to prove anything"
    two = {p: o for p, o in live.items() if len(o) > 1}
    assert not two, f"pids with two final records: {two}"
    for pid in signalled:
        assert live.get(pid) in (["terminated"], ["unconfirmed"]), (pid, live.get(pid))
    for pid, outs in live.items():
        if "terminated" in outs:
            assert pid in signalled, f"pid {pid} recorded terminated, never signalled"
    # The live `once` runs competed for the lock and, losing to the service, said so.
    assert any("holds the leader lock" in o for o in outputs), outputs[:3]
    assert journal_size(audit) == 0


# -- journals of dead and live processes ---------------------------------------------------

_CHILD = """
import json, os, sys
from pathlib import Path
from watchdog.audit.log import AuditLog
audit = AuditLog(Path(sys.argv[1]))
for step, records in json.loads(Path(sys.argv[2]).read_text()):
    if step == "intents":
        audit.write_intents(records)
    elif step == "final":
        audit.append(records)
    elif step == "wait":  # alive, journal locked, until told to go on
        print("ready", flush=True)
        sys.stdin.readline()
os._exit(0)  # no cleanup: as if killed here
"""


def _child(audit: Path, steps: list[Any], tmp_path: Path) -> subprocess.Popen[str]:
    """A process writing to ``audit`` through AuditLog; it exits without any cleanup."""
    script = tmp_path / f"steps-{uuid.uuid4().hex[:6]}.json"
    script.write_text(json.dumps(steps))
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(audit), str(script)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _finished(child: subprocess.Popen[str]) -> int:
    child.communicate(timeout=30)
    return child.returncode


def _fake(pid: int, sweep: str, outcome: str) -> dict[str, Any]:
    """A record of the audit log's shape for a backend that need not exist."""
    ts = "2026-12-01T00:00:00.000Z"
    return {"ts": ts, "target": "main", "policy": "idle", "action": "terminate",
            "dry_run": False, "outcome": outcome, "error": None, "pid": pid,
            "backend_start": ts, "usename": "app", "datname": "postgres",
            "application_name": "victim", "client_addr": None, "state": "idle",
            "state_change": ts, "xact_start": None, "query_start": ts, "age_s": 2.0,
            "query": "SELECT 1", "server": "127.0.0.1:5432", "watchdog_host": "h",
            "watchdog_pid": 1, "sweep": sweep}


def _batch(pids: range, sweep: str, outcome: str) -> list[dict[str, Any]]:
    return [_fake(p, sweep, outcome) for p in pids]


@PARAMS
async def test_dead_process_intents_settled_once_live_process_untouched(
    make_cluster, tmp_path: Path, major: int
) -> None:
    """A dead process left intents; a live one has intents in flight. Three `once` run at
    the same time: the dead one's are recorded unconfirmed exactly once, the live one's are
    left alone, and the live one's own final records are the only ones for its pids."""
    c = _cluster(make_cluster, major)
    audit = tmp_path / "audit.jsonl"
    quiet = write_config(tmp_path / "q.yaml", c, idle="1h", audit=audit)
    dead = _child(audit, [["intents", _batch(range(100, 105), "dead-sweep", "intent")]],
                  tmp_path)
    assert _finished(dead) == 0
    live_intents = _batch(range(200, 205), "live-sweep", "intent")
    live = _child(audit, [["intents", live_intents], ["wait", []],
                          ["final", _batch(range(200, 205), "live-sweep", "terminated")]],
                  tmp_path)
    try:
        assert live.stdout is not None and live.stdout.readline() == "ready\n"
        results = await asyncio.gather(*(asyncio.to_thread(run_cli, "once", "-c", quiet)
                                         for _ in range(3)))
        for res in results:
            assert res.returncode == 0, res.stderr
        outcomes = by_pid(read_records(audit))
        dead_pids = range(100, 105)
        assert {p: outcomes.get(p) for p in dead_pids} == {p: ["unconfirmed"] for p in dead_pids}
        assert not set(outcomes) & set(range(200, 205)), "a live process's intents settled"
        assert journal_size(audit) > 0  # the live one's journal is still there
        live.communicate("go\n", timeout=30)
        assert live.returncode == 0
    finally:
        if live.poll() is None:
            live.kill()
            live.communicate()
    # The live process has exited since (uncleanly): its journal says all is settled.
    assert run_cli("once", "-c", quiet).returncode == 0
    records = read_records(audit)
    check_log(records)
    outcomes = by_pid(records)
    assert {p: outcomes[p] for p in range(200, 205)} == {p: ["terminated"] for p in range(200, 205)}
    assert len(records) == 10
    assert journal_size(audit) == 0


def _rotate(audit: Path) -> None:
    """What logrotate does with compress and no delaycompress."""
    rotated = audit.with_name(audit.name + ".1.gz")
    with gzip.open(rotated, "wb") as f:
        f.write(audit.read_bytes())
    audit.unlink()


def _grow(audit: Path) -> None:
    """Five megabytes of other sweeps' records after the settled ones."""
    filler = b"".join(json.dumps(r).encode() + b"\n"
                      for r in _batch(range(10_000, 10_500), "filler", "terminated"))
    with audit.open("ab") as f:
        while f.tell() < 5 << 20:
            f.write(filler)


@PARAMS
@pytest.mark.parametrize("change", ["rotated", "large"])
async def test_rotated_or_large_log_never_resurrects_settled_intents(
    make_cluster, tmp_path: Path, major: int, change: str
) -> None:
    """A process settled sweep X (final records written) and died with sweep Y in flight;
    then the log is rotated, or grows past 4 MB. Recovery records Y once, never X again."""
    c = _cluster(make_cluster, major)
    audit = tmp_path / "audit.jsonl"
    quiet = write_config(tmp_path / "q.yaml", c, idle="1h", audit=audit)
    child = _child(audit, [
        ["intents", _batch(range(100, 105), "sweep-x", "intent")],
        ["intents", _batch(range(200, 205), "sweep-y", "intent")],
        ["final", _batch(range(100, 105), "sweep-x", "terminated")],
    ], tmp_path)
    assert _finished(child) == 0
    {"rotated": _rotate, "large": _grow}[change](audit)
    for _ in range(2):  # a second recovery finds nothing left
        res = run_cli("once", "-c", quiet)
        assert res.returncode == 0, res.stderr
    outcomes = by_pid(r for r in _all_records(audit) if r["sweep"] != "filler")
    assert outcomes == {**{p: ["terminated"] for p in range(100, 105)},
                        **{p: ["unconfirmed"] for p in range(200, 205)}}, outcomes
    assert journal_size(audit) == 0
    assert set(outcomes[200]) <= SIGNALLED


# -- `once` is an acting instance: it takes the leader lock ---------------------------------


@PARAMS
async def test_live_once_acts_on_nothing_while_another_instance_leads(
    make_cluster, tmp_path: Path, major: int
) -> None:
    """Another instance holds the leader lock: a live `once` signals nothing there and says
    so in one line (exit 0); a dry run never competes, so it still reports what it would do;
    once the lock is free, `once` acts."""
    c = _cluster(make_cluster, major)
    audit = tmp_path / "audit.jsonl"
    cfg = write_config(tmp_path / "p.yaml", c, idle="500ms")
    victims = await open_victims(c, 2)
    pids = pids_of(victims)
    holder = await connect(c, "watchdog", application_name="pg-watchdog")
    try:
        assert await holder.fetchval(queries.TRY_LEAD, LEADER_KEY)
        await asyncio.sleep(0.6)
        res = run_cli("once", "-c", cfg)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert len(lines) == 1 and "holds the leader lock" in lines[0], res.stdout
        assert lines[0].startswith("main ("), lines[0]
        assert res.stderr == "", res.stderr
        res = run_cli("once", "-c", cfg, "--json")
        assert res.returncode == 0, res.stderr
        [summary] = json.loads(res.stdout)["targets"]
        assert summary["leader"] is False and summary["records"] == [], summary
        assert await alive(c, pids) == set(pids)
        assert read_records(audit) == []

        res = run_cli("once", "--dry-run", "-c", cfg, "--json")
        assert res.returncode == 0, res.stderr
        [summary] = json.loads(res.stdout)["targets"]
        assert {r["outcome"] for r in summary["records"]} == {"would_terminate"}, summary
        assert await alive(c, pids) == set(pids)
    finally:
        await holder.close()
    res = run_cli("once", "-c", cfg, "--json")
    assert res.returncode == 0, res.stderr
    assert {r["pid"]: r["outcome"] for r in json.loads(res.stdout)["targets"][0]["records"]} == {
        p: "terminated" for p in pids}
    assert not await alive(c, pids)
    close_all(victims)


def test_files_root_creates_belong_to_the_directory_owner(tmp_path: Path) -> None:
    """A DBA's `once` as root leaves a log and journals the service's user can write and
    settle (its directory's owner), not root-owned files that would block it."""
    assert os.geteuid() == 0, "CI runs as root; this test needs it"
    owner = pwd.getpwnam("postgres")
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chown(logs, owner.pw_uid, owner.pw_gid)
    audit = AuditLog(logs / "audit.jsonl")
    audit.write_intents([_fake(1, "s", "intent")])
    audit.append([_fake(1, "s", "terminated")])
    for path in (audit.path, audit.journal_dir, audit.intent_path):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (owner.pw_uid, owner.pw_gid), path
    audit.close()
