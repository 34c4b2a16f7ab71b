"""The incident of `pg-watchdog demo`: a throwaway server and the leaky application that fills it.

The server gets a small max_connections, the roles of the story and a table of orders; then a
DBA's idle superuser session, a backup holding its snapshot, a long report query and a leaky
application open connections until a new one fails with SQLSTATE 53300. The narration and the
healing are in ``watchdog.commands.demo.command``.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from watchdog.commands.demo.tempcluster import TempCluster, start_cluster

MAX_CONNECTIONS = 20
APP = "leaky-app"
LEAK_PACE = {False: 0.5, True: 0.15}  # seconds between two leaked connections
# The statement of the one code path that leaks: `advise` names it, constants redacted.
LEAKY_STATEMENT = (
    "SELECT id, status FROM orders WHERE id = $1 AND status <> 'cancelled' FOR UPDATE"
)


class DemoError(Exception):
    """The demo could not reproduce or heal the incident."""


class Incident:
    """The throwaway server and the sessions that exhaust it; Demo narrates and heals it."""

    def __init__(self, major: int, fast: bool) -> None:
        self.major, self.fast = major, fast
        self.t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="pg-watchdog-demo-"))
        self.tmp.chmod(0o711)  # the unprivileged server user must reach its data dir inside
        self.audit = self.tmp / "audit.jsonl"
        self.cluster: TempCluster | None = None
        self.conns: list[Any] = []
        self.spared: set[int] = set()
        self.announced = False
        self.audit_offset = 0
        self.report: asyncio.Task[Any] | None = None

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {text}", flush=True)

    # -- the server ------------------------------------------------------------

    def start_server(self) -> TempCluster:
        settings = {"reserved_connections": "2"} if self.major >= 16 else {}
        self.say(f"starting a throwaway PostgreSQL {self.major} in {self.tmp}")
        c = self.cluster = start_cluster(
            self.major, max_connections=MAX_CONNECTIONS, settings=settings, base_dir=self.tmp
        )
        grants = "pg_monitor, pg_signal_backend"
        grants += ", pg_use_reserved_connections" if self.major >= 16 else ""
        c.psql(f"""
            CREATE ROLE app LOGIN; CREATE ROLE backup LOGIN;
            CREATE ROLE watchdog LOGIN; GRANT {grants} TO watchdog;
            CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL DEFAULT 'new');
            INSERT INTO orders (id) SELECT generate_series(1, 100);
            GRANT SELECT, UPDATE ON orders TO app; GRANT SELECT ON orders TO backup;
        """)
        reserved = ", reserved_connections=2" if settings else ""
        self.say(
            f"server on {c.host}:{c.port}: max_connections={MAX_CONNECTIONS}, "
            f"superuser_reserved_connections=3{reserved}; role watchdog has {grants}"
        )
        # This runs on real database hosts: say why no other local user can get in.
        self.say(
            "logins over TCP need the server's random password (SCRAM), which the demo's "
            "clients read from a private passfile; its Unix socket is open to "
            f"{c.os_user or 'this user'} alone"
        )
        return c

    async def connect(self, user: str, app: str) -> Any:
        assert self.cluster is not None
        conn = await asyncpg.connect(
            self.cluster.dsn(user), timeout=5, server_settings={"application_name": app}
        )
        self.conns.append(conn)
        return conn

    # -- the incident ------------------------------------------------------------

    async def incident(self) -> Any:
        """Fill the server; returns the demo's own observer connection."""
        observer = await self.connect("postgres", "pg-watchdog-demo")
        dba = await self.connect("postgres", "dba-console")
        await dba.execute("SELECT pg_size_pretty(pg_database_size(current_database()))")
        self.say("a DBA's superuser session (postgres, 'dba-console') sits idle")
        dump = await self.connect("backup", "pg_dump")
        await dump.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        await dump.execute("SELECT count(*) FROM orders")
        self.say("a backup (backup, 'pg_dump') holds its snapshot: idle in transaction")
        report = await self.connect("app", APP)
        self.report = asyncio.create_task(report.execute("SELECT pg_sleep(600) -- month-end"))
        self.say(f"a long report query (app, '{APP}') runs: active")
        for n in range(1, 4 * MAX_CONNECTIONS):
            try:
                conn = await self.connect("app", APP)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate != "53300":
                    raise
                self.say(f"{APP} cannot open connection {n}; the server answers:")
                print(
                    f"         {exc.severity}:  {exc.args[0]}  (SQLSTATE {exc.sqlstate})",
                    flush=True,
                )
                return observer
            # One code path leaks: it looks an order up FOR UPDATE and forgets the connection,
            # inside the transaction it opened (every third) or outside one.
            if n % 3 == 0:
                await conn.execute("BEGIN")
                what = f"reserves order {n}, never commits: idle in transaction"
            else:
                what = f"reserves order {n}, never returns it to a pool: idle"
            await conn.fetchrow(LEAKY_STATEMENT, n)
            self.say(f"{APP} opens connection {n}, {what}")
            await asyncio.sleep(LEAK_PACE[self.fast])
        raise DemoError(f"the server never refused {APP}: no SQLSTATE 53300")

    # -- the end -----------------------------------------------------------------

    def cleanup(self) -> None:
        if self.cluster is not None:
            self.cluster.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)
        gone = "stopped" if self.cluster is None or not self.cluster.processes() else "NOT stopped"
        left = "removed" if not self.tmp.exists() else "NOT removed"
        print(f"\ncleaned up: PostgreSQL {gone}, {self.tmp} {left}", flush=True)
