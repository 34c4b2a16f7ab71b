"""Shared pieces of the end-to-end scenarios: roles, policy files, the CLI, a mix of sessions.

Everything talks to a real TempCluster; nothing here mocks the database or the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from helpers import connect, wait_for

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.pg import queries

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "pg-watchdog"
WATCHDOG_ROLE = "watchdog"
APP_ROLE = "app"

# Every audit record carries all of these fields (the README's audit log section).
AUDIT_FIELDS = (
    "ts", "target", "policy", "action", "dry_run", "outcome", "error", "pid", "backend_start",
    "usename", "datname", "application_name", "client_addr", "state", "state_change",
    "xact_start", "query_start", "age_s", "query", "server", "watchdog_host",
    "pooler", "pooler_client",  # null unless the backend is held by a PgBouncer of the target
    "blocking", "xmin_age", "watchdog_pid", "sweep",
)
ISO_MS_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
# Processes that live as long as the server: they must all survive every sweep.
TRANSIENT_BACKENDS = ("client backend", "autovacuum worker", "parallel worker")


def setup_roles(pg: TempCluster) -> None:
    """The least-privilege watchdog role (pg_monitor, pg_signal_backend) and an app role.

    Idempotent. The SQL names the roles literally: they are WATCHDOG_ROLE and APP_ROLE.
    """
    pg.psql(
        """
        SELECT 'CREATE ROLE watchdog LOGIN'
        WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'watchdog') \\gexec
        SELECT 'CREATE ROLE app LOGIN'
        WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') \\gexec
        GRANT pg_monitor, pg_signal_backend TO watchdog;
        """
    )
    if pg.major >= 16:
        pg.psql("GRANT pg_use_reserved_connections TO watchdog")


def kill_leftovers(pg: TempCluster) -> None:
    """Terminate sessions an earlier (failed) test of the module may have left behind."""
    pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE usename IN ('app', 'watchdog') AND pid <> pg_backend_pid()"
    )


def policy_file(
    tmp_path: Path,
    pg: TempCluster,
    *,
    audit_path: Path | None = None,
    idle: str = "2s",
    idle_in_transaction: str = "1s",
    interval: str = "30s",
    dry_run: bool | None = None,
    policy_dry_run: bool | None = None,
    max_per_sweep: int | None = None,
    self_trap: bool = False,
    name: str = "policies.yaml",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a policy file for ``pg`` shaped like policies/default.yaml, with short thresholds.

    ``self_trap`` adds a policy that would match the watchdog's own (active) connection if the
    own-backend rule did not spare it.
    """
    policies: list[dict[str, Any]] = [
        {"name": "idle", "state": "idle", "longer_than": idle, "action": "terminate"},
        {
            "name": "idle-in-transaction",
            "state": ["idle in transaction", "idle in transaction (aborted)"],
            "longer_than": idle_in_transaction,
            "action": "terminate",
        },
    ]
    if self_trap:
        policies.append({
            "name": "self-trap", "state": "active", "measured_from": "backend_start",
            "longer_than": "1ms", "users": [WATCHDOG_ROLE], "action": "terminate",
        })
    if policy_dry_run is not None:
        for p in policies:
            p["dry_run"] = policy_dry_run
    doc: dict[str, Any] = {
        "targets": [{"name": "main", "dsn": pg.dsn(WATCHDOG_ROLE), "interval": interval}],
        "exclude": {
            "superusers": True,
            "users": [],
            "applications": ["pg_dump*", "pg_basebackup", "psql"],
            "databases": [],
            "client_addrs": [],
            "listeners": True,
        },
        "policies": policies,
        "audit": {"path": str(audit_path or tmp_path / "audit.jsonl"), "query": "truncate"},
        "alerts": {"sentry": {"dsn": ""}},
    }
    if dry_run is not None:
        doc["dry_run"] = dry_run
    if max_per_sweep is not None:
        doc["limits"] = {"max_per_sweep": max_per_sweep}
    doc.update(extra or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def cli_env() -> dict[str, str]:
    """The environment for a pg-watchdog subprocess: no libpq, systemd or Sentry leakage, but
    the passfile of the throwaway servers (PGPASSFILE, see watchdog.commands.demo.tempauth)."""
    drop = ("PG", "NOTIFY_SOCKET", "WATCHDOG_", "SENTRY_", "JOURNAL_STREAM", "LISTEN_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop) or k == "PGPASSFILE"}


@dataclass
class CliResult:
    rc: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def run_cli(*args: str | Path, timeout: float = 30) -> CliResult:
    """Run the installed ``pg-watchdog`` console script to completion."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN), *map(str, args), env=cli_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        command = " ".join(map(str, args))
        raise AssertionError(f"pg-watchdog {command} hung for {timeout}s") from None
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


async def start_service(config: Path, log_path: Path, *extra: str) -> asyncio.subprocess.Process:
    """Start ``pg-watchdog run -c CONFIG`` with its stderr in ``log_path``."""
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            str(BIN), "run", "-c", str(config), *extra, env=cli_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )


async def stop_process(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM,
                       timeout: float = 10) -> int:
    """Send ``sig`` and wait for the exit code (SIGKILL and fail if it does not exit)."""
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"pg-watchdog did not exit within {timeout}s of {sig!r}") from None


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON Lines audit log (each line must parse)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


async def is_alive(conn: asyncpg.Connection) -> bool:
    """Whether the connection still answers ``SELECT 1`` (a terminated one raises)."""
    try:
        return bool(await conn.fetchval("SELECT 1", timeout=5) == 1)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
            OSError):
        # Depending on when asyncpg reads the server's FATAL, a terminated connection raises
        # AdminShutdownError, ConnectionDoesNotExistError or an InternalClientError.
        return False


async def backends(admin: asyncpg.Connection) -> dict[int, dict[str, Any]]:
    """pid -> pg_stat_activity row, read fresh (one statement, own snapshot)."""
    rows = await admin.fetch(
        "SELECT pid, backend_type, backend_start, state, state_change, application_name, usename"
        " FROM pg_stat_activity"
    )
    return {r["pid"]: dict(r) for r in rows}


async def server_backends(admin: asyncpg.Connection) -> set[tuple[int, str]]:
    """The long-lived non-client processes of the server (checkpointer, autovacuum launcher...)."""
    return {
        (pid, r["backend_type"])
        for pid, r in (await backends(admin)).items()
        if r["backend_type"] not in TRANSIENT_BACKENDS
    }


async def wait_gone(admin: asyncpg.Connection, pid: int, timeout: float = 5) -> None:
    async def gone() -> bool:
        return pid not in await backends(admin)

    await wait_for(gone, timeout, what=f"backend {pid} to exit")


async def idle_app_session(pg: TempCluster, application_name: str,
                           user: str = APP_ROLE) -> asyncpg.Connection:
    """A session that ran one statement and now sits idle (its state_change is now)."""
    conn = await connect(pg, user, application_name)
    await conn.execute("SELECT 1")
    return conn


@dataclass
class Mix:
    """The scenario: victims past their thresholds, and everything a sweep must spare."""

    victims: dict[str, asyncpg.Connection]
    spared: dict[str, asyncpg.Connection]
    active: asyncpg.Connection | None = None
    active_task: asyncio.Task[Any] | None = None
    pids: dict[str, int] = field(default_factory=dict)

    def conns(self) -> dict[str, asyncpg.Connection]:
        out = {**self.victims, **self.spared}
        if self.active is not None:
            out["active"] = self.active
        return out

    def victim_pids(self) -> set[int]:
        return {self.pids[n] for n in self.victims}

    def name_of(self, pid: int) -> str:
        return next(n for n, p in self.pids.items() if p == pid)

    async def close(self) -> None:
        if self.active_task is not None and not self.active_task.done():
            self.active_task.cancel()
            await asyncio.gather(self.active_task, return_exceptions=True)
        for conn in self.conns().values():
            conn.terminate()


async def open_old_sessions(pg: TempCluster) -> Mix:
    """Sessions that will be old at sweep time: two victims and three that are excluded."""
    mix = Mix(victims={}, spared={})
    mix.victims["idle"] = await idle_app_session(pg, "billing-api")
    iit = await connect(pg, APP_ROLE, "billing-worker")
    await iit.execute("BEGIN; SELECT 1")
    mix.victims["idle_in_transaction"] = iit
    mix.spared["superuser"] = await idle_app_session(pg, "admin-console", user="postgres")
    mix.spared["pg_dump"] = await idle_app_session(pg, "pg_dump_nightly")
    listener = await connect(pg, APP_ROLE, "notifier")
    await listener.execute("LISTEN wd_events")
    mix.spared["listener"] = listener
    for name, conn in mix.conns().items():
        mix.pids[name] = conn.get_server_pid()
    return mix


async def open_young_sessions(pg: TempCluster, mix: Mix, admin: asyncpg.Connection) -> None:
    """Right before the sweep: an idle session under its threshold and one busy in pg_sleep."""
    mix.spared["young"] = await idle_app_session(pg, "billing-api")
    mix.pids["young"] = mix.spared["young"].get_server_pid()
    mix.active = await connect(pg, APP_ROLE, "reporting")
    mix.pids["active"] = mix.active.get_server_pid()
    mix.active_task = asyncio.create_task(mix.active.fetchval("SELECT pg_sleep(30)"))

    async def sleeping() -> bool:
        row = (await backends(admin)).get(mix.pids["active"])
        return row is not None and row["state"] == "active"

    await wait_for(sleeping, 5, what="the pg_sleep(30) session to be active")


@contextlib.asynccontextmanager
async def kept_young(conn: asyncpg.Connection, every: float = 0.3) -> AsyncIterator[None]:
    """Inside, ``conn`` runs ``SELECT 1`` every ``every`` s: an idle session whose idle time
    stays far under a threshold of seconds, however long a `pg-watchdog` process takes to
    start and look on a loaded machine. It stops at the first error (the session was
    terminated): the caller's own checks say so."""
    stop = asyncio.Event()

    async def refresh() -> None:
        while not stop.is_set():
            try:
                await conn.execute("SELECT 1")
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    task = asyncio.create_task(refresh())
    try:
        yield
    finally:
        stop.set()
        await task


async def check_active_alive(mix: Mix, admin: asyncpg.Connection) -> None:
    """The pg_sleep session is still running; cancel it and show its connection works."""
    assert mix.active is not None and mix.active_task is not None
    row = (await backends(admin)).get(mix.pids["active"])
    assert row is not None and row["state"] == "active", row
    assert not mix.active_task.done()
    mix.active_task.cancel()
    await asyncio.gather(mix.active_task, return_exceptions=True)
    assert await is_alive(mix.active), "the active session died"


def check_record(rec: Mapping[str, Any], pg: TempCluster, *, outcome: str, dry_run: bool,
                 idle: float = 2.0, idle_in_transaction: float = 1.0) -> None:
    """One audit record is complete and well-formed: every field, each of its type."""
    missing = [f for f in AUDIT_FIELDS if f not in rec]
    assert not missing, f"audit record lacks {missing}: {rec}"
    assert ISO_MS_UTC.match(rec["ts"]), rec["ts"]
    for ts_field in ("backend_start", "state_change", "query_start"):
        assert ISO_MS_UTC.match(rec[ts_field]), (ts_field, rec[ts_field])
    assert rec["target"] == "main"
    assert rec["action"] == "terminate"
    assert rec["dry_run"] is dry_run
    assert rec["outcome"] == outcome
    assert rec["error"] is None
    assert isinstance(rec["pid"], int)
    assert rec["usename"] == APP_ROLE
    assert rec["datname"] == "postgres"
    assert rec["client_addr"] == "127.0.0.1"
    assert rec["server"] == f"127.0.0.1:{pg.port}"
    assert rec["watchdog_host"] == os.uname().nodename
    assert isinstance(rec["age_s"], int | float)
    if rec["policy"] == "idle":
        assert rec["state"] == "idle"
        assert rec["xact_start"] is None
        assert rec["age_s"] > idle
        assert rec["query"] == "SELECT 1"
    else:
        assert rec["policy"] == "idle-in-transaction", rec
        assert rec["state"] == "idle in transaction"
        assert ISO_MS_UTC.match(rec["xact_start"]), rec["xact_start"]
        assert rec["age_s"] > idle_in_transaction
        assert rec["query"] == "BEGIN; SELECT 1"


def records_by_pid(records: Iterable[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    out: dict[int, list[Mapping[str, Any]]] = {}
    for r in records:
        out.setdefault(r["pid"], []).append(r)
    return out


class HookConn:
    """The watchdog's real connection; ``before_act`` runs once, just before the action
    statement goes to the server: the window between the watchdog's look and its act."""

    def __init__(self, conn: asyncpg.Connection,
                 before_act: Callable[[], Awaitable[None]]) -> None:
        self._conn = conn
        self._hook: Callable[[], Awaitable[None]] | None = before_act

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if query == queries.ACT and self._hook is not None:
            hook, self._hook = self._hook, None
            await hook()
        return await self._conn.fetch(query, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)
