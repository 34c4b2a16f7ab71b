"""Every command ends quietly when its reader goes away (`pg-watchdog once | head -1`): no
traceback, no "Exception ignored", its usual exit code, and for `once` its records written and
its alerts sent first. stdout is a real pipe whose reading end is closed before it writes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import audit_records
from faults import close_all, open_victims, pids_of
from scenario import kill_leftovers, setup_roles
from sentry_endpoint import SentryEndpoint

from watchdog.commands.demo.tempcluster import TempCluster


def closed_pipe_run(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``pg-watchdog ARGS`` with stdout a pipe nobody reads any more."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "watchdog", *args],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=120, check=False,
            env={**os.environ, **(env or {})},
        )
    finally:
        os.close(write)


def assert_quiet(proc: subprocess.CompletedProcess[str]) -> None:
    for noise in ("Traceback", "Exception ignored", "BrokenPipeError", "Broken pipe"):
        assert noise not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    kill_leftovers(pg)
    return pg


@pytest.fixture
def sentry() -> Iterator[SentryEndpoint]:
    with SentryEndpoint() as endpoint:
        yield endpoint


def policy(tmp_path: Path, cluster: TempCluster, sentry: SentryEndpoint) -> Path:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"""
targets: [{{name: main, dsn: "{cluster.dsn("watchdog")}"}}]
policies: [{{name: idle, state: idle, longer_than: 1s, users: [app]}}]
audit: {{path: "{tmp_path / "audit.jsonl"}"}}
alerts: {{sentry: {{dsn: "{sentry.dsn}", environment: test}}}}
"""
    )
    return cfg


@pytest.mark.parametrize("flags", [[], ["--json"]], ids=["table", "json"])
async def test_once_acts_records_and_alerts_then_ends_quietly(
    cluster: TempCluster, tmp_path: Path, sentry: SentryEndpoint, flags: list[str]
) -> None:
    cfg = policy(tmp_path, cluster, sentry)
    victims = await open_victims(cluster, 3)
    await asyncio.sleep(1.2)
    try:
        proc = await asyncio.to_thread(closed_pipe_run, "once", "-c", str(cfg), *flags)
    finally:
        close_all(victims)
    assert_quiet(proc)
    assert proc.returncode == 0, proc.stderr
    records = audit_records(tmp_path / "audit.jsonl")
    assert sorted(r["pid"] for r in records) == sorted(pids_of(victims))
    assert {r["outcome"] for r in records} == {"terminated"}
    events = sentry.wait_events(1)
    assert events[0]["message"].startswith("terminated 3 sessions on main"), events


def test_once_keeps_its_exit_code(tmp_path: Path, sentry: SentryEndpoint) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"""
targets: [{{name: main, dsn: "postgresql://watchdog@127.0.0.1:1/postgres"}}]
policies: [{{name: idle, state: idle, longer_than: 1s}}]
audit: {{path: "{tmp_path / "audit.jsonl"}"}}
alerts: {{sentry: {{dsn: "{sentry.dsn}", environment: test}}}}
"""
    )
    proc = closed_pipe_run("once", "-c", str(cfg))
    assert_quiet(proc)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("pg-watchdog: main: ")
    assert sentry.wait_events(1)[0]["tags"]["kind"] == "unreachable"


COMMANDS = [
    ["check"],
    ["check", "--connect"],
    ["status"],
    ["status", "--json"],
    ["status", "--explain"],
    ["audit"],
    ["audit", "--json"],
    ["audit", "--summary"],
    ["advise"],
    ["advise", "--json"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_ends_quietly(
    cluster: TempCluster, tmp_path: Path, sentry: SentryEndpoint, command: list[str]
) -> None:
    cfg = policy(tmp_path, cluster, sentry)
    record = {
        "ts": "2030-01-01T00:00:00.000Z", "target": "main", "policy": "idle",
        "action": "terminate", "dry_run": False, "outcome": "terminated", "pid": 1,
        "usename": "app", "datname": "postgres", "application_name": "leaky",
    }
    (tmp_path / "audit.jsonl").write_text(json.dumps(record) + "\n")
    proc = closed_pipe_run(*command, "-c", str(cfg))
    assert_quiet(proc)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_end_quietly(flag: str) -> None:
    proc = closed_pipe_run(flag)
    assert_quiet(proc)
    assert proc.returncode == 0, proc.stderr


def test_demo_cleans_up_and_ends_quietly() -> None:
    # Its own TMPDIR (reachable by the unprivileged server user): whatever the demo made
    # there must be gone, processes included.
    tmp = Path(tempfile.mkdtemp(prefix="pgwd-pipe-", dir="/tmp"))
    tmp.chmod(0o711)
    try:
        proc = closed_pipe_run("demo", "--fast", env={"TMPDIR": str(tmp)})
        assert_quiet(proc)
        assert proc.returncode == 0, proc.stderr
        assert list(tmp.iterdir()) == []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    assert str(tmp) not in (entry / "cmdline").read_bytes().decode(errors="replace")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
