"""Running the real `pg-watchdog run` process in tests, and watching sessions from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from watchdog.commands.demo.tempcluster import TempCluster


def write_config(
    path: Path,
    cluster: TempCluster,
    *,
    idle: str = "1s",
    interval: str = "1s",
    audit: Path | None = None,
    extra: str = "",
    dsn: str | None = None,
    pooler_dsn: str | None = None,
) -> Path:
    """A policy file for one target on ``cluster``, acting on idle sessions of role app
    (``pooler_dsn``: a PgBouncer in front of it, named pgb1)."""
    audit = audit or path.parent / "audit.jsonl"
    poolers = f"\n    poolers: [{{name: pgb1, dsn: '{pooler_dsn}'}}]" if pooler_dsn else ""
    path.write_text(
        f"""
targets:
  - name: main
    dsn: {dsn or cluster.dsn("watchdog")}
    interval: {interval}{poolers}
exclude:
  superusers: true
  applications: ["pg_dump*", "psql"]
policies:
  - name: idle
    state: idle
    longer_than: {idle}
    users: [app]
audit:
  path: {audit}
{extra}
"""
    )
    return path


class Daemon:
    """A `pg-watchdog run` subprocess with its stderr in a file."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, *args: str) -> None:
        self.log_path = config.with_suffix(f".{time.monotonic_ns()}.log")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watchdog", "run", "-c", str(config), *args],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` once (a test that already signalled it calls :meth:`wait`) and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        """Its exit code, without signalling it: a second SIGTERM that lands after the service
        has removed its handlers, just before it exits, kills it (-15)."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


async def backend_alive(cluster: TempCluster, pid: int) -> bool:
    """Whether a backend pid is still in pg_stat_activity, asked from another session."""
    conn = await asyncpg.connect(cluster.dsn("postgres"), timeout=10)
    try:
        return bool(
            await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
        )
    finally:
        await conn.close()


def audit_records(path: Path) -> list[dict[str, Any]]:
    """Every record of an audit log (empty if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
