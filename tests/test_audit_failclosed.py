"""Fail closed: when the audit log cannot be written, nothing is signalled and the user is told.

The process runs as root in CI, and chmod does not stop root: the unwritable paths here are
ones no user can create (a parent that does not exist, a parent that is a regular file).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
from helpers import connect, sweeps_ran, wait_for
from scenario import (
    backends,
    idle_app_session,
    is_alive,
    policy_file,
    read_audit,
    run_cli,
    start_service,
    stop_process,
)

from watchdog.commands.demo.tempcluster import TempCluster


def _missing_dir(tmp_path: Path) -> Path:
    return tmp_path / "no-such-dir" / "audit.jsonl"


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("not a directory\n")
    return tmp_path / "afile" / "audit.jsonl"


UNWRITABLE: dict[str, Callable[[Path], Path]] = {
    "missing-dir": _missing_dir,
    "under-a-file": _under_a_file,
}


async def _victims(pg: TempCluster) -> list[asyncpg.Connection]:
    """Sessions that every policy of the file would terminate right now."""
    conns = [await idle_app_session(pg, f"victim-{i}") for i in range(3)]
    iit = await connect(pg, "app", "victim-iit")
    await iit.execute("BEGIN; SELECT 1")
    conns.append(iit)
    await asyncio.sleep(1.2)  # idle 1s and idle in transaction 1s are both past
    return conns


INFO_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ")


def _one_clear_line(stderr: str, audit_path: Path, *, service: bool = False) -> str:
    lines = stderr.splitlines()
    if service:
        # The service logs its start-up at INFO (e.g. "Sentry alerts off"); besides those,
        # the refusal is one line.
        lines = [line for line in lines if not INFO_LOG.match(line)]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pg-watchdog: "), lines[0]
    assert str(audit_path) in lines[0], lines[0]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("where", list(UNWRITABLE))
async def test_once_refuses_and_signals_nothing(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path, where: str
) -> None:
    audit_path = UNWRITABLE[where](tmp_path)
    config = policy_file(tmp_path, pg, audit_path=audit_path, idle="1s")
    conns = await _victims(pg)
    try:
        pids = [c.get_server_pid() for c in conns]
        before = await backends(admin)
        for extra in ((), ("--json",)):
            res = await run_cli("once", "-c", config, *extra)
            assert res.rc != 0, res.stdout
            line = _one_clear_line(res.stderr, audit_path)
            assert "audit" in line.lower(), line
        # Nothing was signalled: same backends, idle clocks untouched, each answers.
        after = await backends(admin)
        for pid in pids:
            assert pid in after
            assert after[pid]["state_change"] == before[pid]["state_change"]
        for c in conns:
            assert await is_alive(c)
        assert not audit_path.exists()
    finally:
        for c in conns:
            c.terminate()


@pytest.mark.parametrize("where", list(UNWRITABLE))
async def test_run_refuses_to_start(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path, where: str
) -> None:
    audit_path = UNWRITABLE[where](tmp_path)
    config = policy_file(tmp_path, pg, audit_path=audit_path, idle="1s", interval="1s")
    conns = await _victims(pg)
    log = tmp_path / "run.log"
    proc = await start_service(config, log)
    try:
        try:
            rc = await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            raise AssertionError(f"pg-watchdog run started anyway: {log.read_text()}") from None
        assert rc != 0
        _one_clear_line(log.read_text(), audit_path, service=True)
        for c in conns:
            assert await is_alive(c)
        assert not any(r["application_name"] == "pg-watchdog"
                       for r in (await backends(admin)).values())
    finally:
        if proc.returncode is None:
            await stop_process(proc)
        for c in conns:
            c.terminate()


async def test_run_signals_nothing_while_the_log_is_unwritable(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """The log directory disappears under a running service (a regular file takes its place):
    idle sessions past their threshold live on; once the directory is back, they go."""
    logs = tmp_path / "logs"
    logs.mkdir()
    audit_path = logs / "audit.jsonl"
    config = policy_file(tmp_path, pg, audit_path=audit_path, idle="1s", interval="1s")
    log = tmp_path / "run.log"
    proc = await start_service(config, log)
    conns: list[asyncpg.Connection] = []
    try:
        async def connected() -> bool:
            assert proc.returncode is None, log.read_bytes().decode()
            return any(r["application_name"] == "pg-watchdog"
                       for r in (await backends(admin)).values())

        await wait_for(connected, 10, what="pg-watchdog run to connect")
        logs.rename(tmp_path / "logs.away")
        logs.write_text("not a directory\n")
        conns = [await idle_app_session(pg, f"victim-{i}") for i in range(2)]
        pids = [c.get_server_pid() for c in conns]
        await asyncio.sleep(1.2)  # threshold 1s
        await sweeps_ran(pg, 3)
        present = await backends(admin)
        assert all(pid in present for pid in pids), "signalled without an audit log"
        assert proc.returncode is None, "the service died instead of waiting for its log"
        text = log.read_bytes().decode()
        assert str(audit_path) in text and "ERROR" in text, text

        logs.unlink()
        (tmp_path / "logs.away").rename(logs)

        async def all_gone() -> bool:
            return not set(pids) & set(await backends(admin))

        await wait_for(all_gone, 5, what="the victims to be terminated once the log is back")

        def logged_all() -> bool:
            # Final records follow the confirmation look: a backend can vanish first.
            return len([r for r in read_audit(audit_path) if r["pid"] in pids]) >= len(pids)

        await wait_for(logged_all, 5, what="their audit records")
        logged = [r for r in read_audit(audit_path) if r["pid"] in pids]
        assert sorted(r["pid"] for r in logged) == sorted(pids)
        assert {r["outcome"] for r in logged} == {"terminated"}
        assert await stop_process(proc, timeout=5) == 0
    finally:
        if proc.returncode is None:
            await stop_process(proc)
        for c in conns:
            c.terminate()
