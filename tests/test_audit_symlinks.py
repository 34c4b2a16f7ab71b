"""Root never follows what the audit directory's owner planted there.

/var/log/pg-watchdog belongs to the service's user, and DBAs run `pg-watchdog once` as
root. Here a real unprivileged user (useradd, removed afterwards) owns the audit
directory and plants symbolic links into a root-only directory, a FIFO and a directory
named like a journal. `once` and `once --dry-run` as root, against real sessions past
their thresholds, never create, chown, read or write through them, and fail closed with
one clear line where they cannot record.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from scenario import (
    BIN,
    backends,
    cli_env,
    idle_app_session,
    is_alive,
    policy_file,
    read_audit,
    run_cli,
)

from watchdog.commands.demo.tempcluster import TempCluster

MARKER = "ROOT-ONLY-SECRET"
USER_MARKER = "NOT-A-JOURNAL"


def _intent_line(usename: str) -> str:
    return json.dumps({"ts": "2026-01-01T00:00:00.000Z", "target": "main", "policy": "idle",
                       "action": "terminate", "dry_run": False, "outcome": "intent",
                       "pid": 4242, "usename": usename, "sweep": "planted"}) + "\n"


@pytest.fixture
def service_user() -> Iterator[pwd.struct_passwd]:
    """A real unprivileged OS user, removed at the end."""
    assert os.geteuid() == 0, "CI runs as root; this test is about root"
    name = f"pgwd{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@dataclass
class Layout:
    logs: Path  # owned by the service user
    audit: Path
    root_only: Path  # 0700 root: what the user must never reach through root
    user_area: Path  # the user's own files elsewhere (readable by them)

    def snapshot(self) -> dict[str, tuple[int, int, int, float, bytes]]:
        """What the root-only directory holds: each file's owner, mode, mtime and bytes."""
        out = {}
        for p in sorted(self.root_only.iterdir()):
            st = p.lstat()
            out[p.name] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime,
                           p.read_bytes())
        return out


@pytest.fixture
def layout(tmp_path: Path, service_user: pwd.struct_passwd) -> Iterator[Layout]:
    uid, gid = service_user.pw_uid, service_user.pw_gid
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o750)
    os.chown(logs, uid, gid)
    root_only = tmp_path / "root-only"
    root_only.mkdir(mode=0o700)
    secret = root_only / "secret.intent"
    secret.write_text(_intent_line(MARKER))
    secret.chmod(0o600)
    user_area = Path(tempfile.mkdtemp(prefix="pgwd-user-"))
    os.chown(user_area, uid, gid)
    try:
        yield Layout(logs, logs / "audit.jsonl", root_only, user_area)
    finally:
        shutil.rmtree(user_area, ignore_errors=True)


def _as_user(layout: Layout, user: pwd.struct_passwd) -> None:
    """Everything under the audit directory belongs to its user, as if they made it."""
    for p in [layout.logs, *layout.logs.rglob("*")]:
        os.chown(p, user.pw_uid, user.pw_gid, follow_symlinks=False)


def _plant(layout: Layout, user: pwd.struct_passwd, how: str) -> None:
    intents = layout.logs / "audit.jsonl.intents"
    if how == "dangling-log":
        layout.audit.symlink_to(layout.root_only / "created.jsonl")
    elif how == "journal-links":
        intents.mkdir(mode=0o750)
        (intents / "4242-0badc0de.intent").symlink_to(layout.root_only / "secret.intent")
        # A link to a file the user may read: only O_NOFOLLOW stops this one.
        mine = layout.user_area / "mine.intent"
        mine.write_text(_intent_line(USER_MARKER))
        os.chown(mine, user.pw_uid, user.pw_gid)
        (intents / "4243-0badc0de.intent").symlink_to(mine)
        os.mkfifo(intents / "4244-0badc0de.intent")  # would hang a plain open for reading
        (intents / "4245-0badc0de.intent").mkdir()
        (intents / ".new-4246-0badc0de.intent").symlink_to(layout.root_only / "new.intent")
    elif how == "journals-dir-link":
        intents.symlink_to(layout.root_only)
    else:
        raise AssertionError(how)
    _as_user(layout, user)


async def _victims(pg: TempCluster) -> list[asyncpg.Connection]:
    conns = [await idle_app_session(pg, f"victim-{i}") for i in range(2)]
    await asyncio.sleep(1.2)  # past the 1s threshold
    return conns


def _one_line(stderr: str, *needles: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pg-watchdog: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("how", ["dangling-log", "journals-dir-link"])
async def test_root_refuses_to_record_through_a_planted_link(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path, layout: Layout,
    service_user: pwd.struct_passwd, how: str,
) -> None:
    """Where the log or the journals are links, root writes nothing anywhere, signals
    nothing, and says why in one line (exit 1), dry run included."""
    _plant(layout, service_user, how)
    before = layout.snapshot()
    config = policy_file(tmp_path, pg, audit_path=layout.audit, idle="1s")
    conns = await _victims(pg)
    try:
        pids = [c.get_server_pid() for c in conns]
        for extra in ((), ("--dry-run",), ("--json",)):
            res = await run_cli("once", "-c", config, *extra)
            assert res.rc == 1, (extra, res.stdout, res.stderr)
            name = "audit.jsonl.intents" if how == "journals-dir-link" else "audit.jsonl"
            _one_line(res.stderr, str(layout.audit), str(layout.logs / name),
                      "symbolic link (not followed)")
        assert layout.snapshot() == before, "root wrote through a link the user planted"
        assert not (layout.root_only / "created.jsonl").exists()
        present = await backends(admin)
        assert all(pid in present for pid in pids), "signalled without an audit record"
        for c in conns:
            assert await is_alive(c)
        assert sorted(p.name for p in layout.logs.iterdir()) == [
            "audit.jsonl" if how == "dangling-log" else "audit.jsonl.intents"]
    finally:
        for c in conns:
            c.terminate()


async def test_root_ignores_planted_journals_and_records_as_the_owner(
    pg: TempCluster, admin: asyncpg.Connection, tmp_path: Path, layout: Layout,
    service_user: pwd.struct_passwd,
) -> None:
    """Journal entries that are links, a FIFO or a directory are ignored (logged once each),
    never read, written or removed; the sweep acts and records, in files the directory's
    owner owns; the root-only file is untouched and its content is nowhere in the log."""
    _plant(layout, service_user, "journal-links")
    intents = layout.logs / "audit.jsonl.intents"
    planted = sorted(p.name for p in intents.iterdir())
    before = layout.snapshot()
    config = policy_file(tmp_path, pg, audit_path=layout.audit, idle="1s")
    conns = await _victims(pg)
    try:
        pids = [c.get_server_pid() for c in conns]
        dry = await run_cli("once", "--dry-run", "-c", config, "--json")
        assert dry.rc == 0, dry.stderr
        res = await run_cli("once", "-c", config, "--json")
        assert res.rc == 0, res.stderr
        for out in (dry, res):
            ignored = [line for line in out.stderr.splitlines() if "ignoring" in line]
            assert len(ignored) == 5, out.stderr  # each planted entry once, not once per look
            assert "Traceback" not in out.stderr
        records = read_audit(layout.audit)
        assert sorted((r["pid"], r["outcome"]) for r in records) == sorted(
            [(p, "would_terminate") for p in pids] + [(p, "terminated") for p in pids])
        text = layout.audit.read_text()
        assert MARKER not in text and USER_MARKER not in text
        assert layout.snapshot() == before
        assert sorted(p.name for p in intents.iterdir()) == planted  # none read or removed
        assert (layout.user_area / "mine.intent").read_text() == _intent_line(USER_MARKER)
        st = layout.audit.lstat()
        assert stat.S_ISREG(st.st_mode)
        assert (st.st_uid, st.st_gid) == (service_user.pw_uid, service_user.pw_gid)
        present = await backends(admin)
        assert not set(pids) & set(present)
    finally:
        for c in conns:
            c.terminate()


def test_audit_as_root_reads_no_planted_link(
    tmp_path: Path, layout: Layout, service_user: pwd.struct_passwd
) -> None:
    """`pg-watchdog audit` as root: a rotated-looking link into the root-only directory is
    skipped with a warning, never read; the log itself as a link is one line, exit 1."""
    record = {"ts": "2026-01-01T00:00:00.000Z", "target": "main", "policy": "idle",
              "outcome": "terminated", "pid": 7, "usename": "app"}
    layout.audit.write_text(json.dumps(record) + "\n")
    secret = layout.root_only / "secret.jsonl"
    secret.write_text(json.dumps(record | {"usename": MARKER}) + "\n")
    secret.chmod(0o600)
    (layout.logs / "audit.jsonl.1").symlink_to(secret)
    os.mkfifo(layout.logs / "audit.jsonl.2")  # a FIFO must not hang the reader
    _as_user(layout, service_user)
    for extra in ((), ("--json",), ("--summary",)):
        res = _audit(layout.audit, *extra)
        assert res.returncode == 0, res.stderr
        assert MARKER not in res.stdout + res.stderr
        assert "not following" in res.stderr and "Traceback" not in res.stderr
    layout.audit.unlink()
    layout.audit.symlink_to(secret)
    res = _audit(layout.audit, "--json")
    assert res.returncode == 1
    assert res.stdout == "" and MARKER not in res.stderr and "Traceback" not in res.stderr
    last = res.stderr.splitlines()[-1]
    assert last == (f"pg-watchdog: cannot read audit log {layout.audit}: "
                    "is a symbolic link (not followed)"), res.stderr


def _audit(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN), "audit", "--file", str(path), *extra], env=cli_env(),
                          capture_output=True, text=True, timeout=30, check=False)
