"""One target under watch: its held connection, reconnect backoff, leadership and sweeps."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import asyncpg

from watchdog import queries
from watchdog.audit import AuditError, AuditLog
from watchdog.config import Config, Target
from watchdog.connect import TargetError, connect, describe_error, server_address
from watchdog.pooler_watch import PoolerWatch
from watchdog.sweep import SweepReport, sweep_target

log = logging.getLogger(__name__)

# What a sick server or network raises; anything else escaping a sweep is a bug.
_SERVER_TROUBLE = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


def sweep_timeout(interval: float) -> float:
    """How long a sweep may take before the server is deemed hung and the connection dropped.

    A sweep is one snapshot, one action statement and a short confirmation:
    milliseconds normally. Two intervals, within 5-20 s.
    """
    return min(max(2 * interval, 5.0), 20.0)


class TargetRunner:
    """Keeps one monitoring connection to a target and sweeps it on demand."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.conn: Any = None
        self.server = "?"
        self.leader = False
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.poolers = PoolerWatch(target) if target.poolers else None

    @property
    def up(self) -> bool:
        """Whether the monitoring connection is open."""
        return self.conn is not None and not self.conn.is_closed()

    async def _ensure_connected(self) -> None:
        if self.up:
            return
        if time.monotonic() < self.retry_at:
            raise TargetError(f"{self.target.name}: {self.last_error} (retrying)")
        try:
            self.conn = await connect(self.target)
            self.server = await server_address(self.conn)
        except Exception as exc:
            await self._drop()
            self.failures += 1
            # Full jitter keeps several watchdogs from reconnecting in lockstep.
            delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(self.failures, 16))
            self.retry_at = time.monotonic() + random.uniform(delay / 2, delay)
            self.last_error = describe_error(self.target, exc)
            log.warning(
                "%s; next attempt in %.1fs", self.last_error, self.retry_at - time.monotonic()
            )
            raise TargetError(self.last_error) from None
        if self.failures:
            log.info(
                "%s: reconnected to %s after %d failures",
                self.target.name,
                self.server,
                self.failures,
            )
        else:
            log.info("%s: connected to %s", self.target.name, self.server)
        self.failures = 0
        self.last_error = None

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if self.leader:
            log.warning("%s: lost the leader lock with the connection", self.target.name)
        self.leader = False
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _lead(self) -> None:
        if not self.leader:
            # Session-level lock on the held connection: released by the server when
            # this connection goes away, so another instance takes over.
            self.leader = bool(await self.conn.fetchval(queries.TRY_LEAD, queries.LEADER_KEY))
            if self.leader:
                log.info("%s: this instance acts (leader lock held)", self.target.name)
            else:
                log.info("%s: another pg-watchdog instance acts; observing", self.target.name)

    async def sweep(self, config: Config, audit: AuditLog, dry_run: bool) -> SweepReport:
        """Connect if needed, then sweep; TargetError or AuditError on failure."""
        await self._ensure_connected()
        try:
            async with asyncio.timeout(sweep_timeout(self.target.interval)):
                await self._lead()
                return await sweep_target(
                    self.conn,
                    self.server,
                    config,
                    self.target,
                    audit,
                    dry_run=dry_run,
                    leader=self.leader,
                    poolers=self.poolers,
                )
        except AuditError:
            raise
        except Exception as exc:
            if not isinstance(exc, _SERVER_TROUBLE):
                # Not the server's doing: a bug of ours. Keep its traceback for the journal.
                log.exception("%s: sweep failed", self.target.name)
            self.last_error = describe_error(self.target, exc)
            await self._drop()
            raise TargetError(self.last_error) from None

    async def close(self) -> None:
        """Close the held connections (the target's and its poolers')."""
        if self.poolers is not None:
            await self.poolers.close()
        conn, self.conn = self.conn, None
        self.leader = False
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:
                conn.terminate()
