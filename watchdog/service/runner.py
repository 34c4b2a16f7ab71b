"""One target under watch: its held connection, reconnect backoff, leadership and sweeps."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg

from watchdog.audit.log import AuditError, AuditLog
from watchdog.audit.offloop import AUDIT_TIMEOUT
from watchdog.config.policy import Config, Target
from watchdog.core import backoff
from watchdog.pg import queries
from watchdog.pg.connect import (
    TargetError,
    close_quietly,
    describe_error,
    open_target,
)
from watchdog.pg.prepared import PreparedWatch, PreparedXact
from watchdog.pgbouncer.watch import PoolerWatch
from watchdog.service.sweep import Progress, SweepReport, sweep_target

log = logging.getLogger("watchdog.runner")  # the name log filters know

# What a sick server or network raises; anything else escaping a sweep is a bug.
_SERVER_TROUBLE = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
# One small catalog read between two sweeps: a server too slow for it is the next sweep's news.
PREPARED_TIMEOUT = 2.0


def sweep_timeout(interval: float) -> float:
    """How long a sweep may take before the server is deemed hung and the connection dropped.

    A sweep is one snapshot, one action statement and a short confirmation:
    milliseconds normally. Two intervals, within 5-20 s.
    """
    return min(max(2 * interval, 5.0), 20.0)


def longest_sweep(interval: float) -> float:
    """How long one sweep of the service may legitimately run: the server's timeout, plus the
    audit log's own bounded waits (a backlog, the intents, the final records), which that
    timeout does not count, plus the read of prepared transactions after it."""
    return sweep_timeout(interval) + 3 * AUDIT_TIMEOUT + PREPARED_TIMEOUT


class TargetRunner:
    """Keeps one monitoring connection to a target and sweeps it on demand."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.conn: Any = None
        self.server = "?"
        # The connection on which the lock was won, and its key. Leadership belongs to that
        # connection, never to this object: a new connection starts as an observer and
        # leads only once it has won the lock itself.
        self._lock: tuple[Any, int] | None = None
        self._role = ""
        self.backoff = backoff.Backoff()
        self.last_error: str | None = None
        self.poolers = PoolerWatch(target) if target.poolers else None
        # The DSN the open connection was made with (a reload may name another).
        self._dsn = target.dsn
        # Held by a sweep; a reload takes it to change the runner between two sweeps.
        self._busy = asyncio.Lock()

    @property
    def leader(self) -> bool:
        """Whether this instance holds the leader lock on its open connection."""
        return self._lock is not None and self._lock[0] is self.conn and self.up

    @property
    def up(self) -> bool:
        """Whether the monitoring connection is open."""
        return self.conn is not None and not self.conn.is_closed()

    async def _ensure_connected(self) -> None:
        if self.up:
            return
        if self.conn is not None:
            # Closed under us (server restart, terminated, kernel gave up on a silent peer):
            # the lock went with it.
            await self._drop()
        if self.backoff.waiting(time.monotonic()):
            # The same message as the failed attempt: one outage, one alert.
            raise TargetError(self.last_error or f"{self.target.name}: unreachable")
        try:
            self._dsn = self.target.dsn
            self.conn, self.server = await open_target(self.target)
        except Exception as exc:
            await self._drop()
            wait = self.backoff.failed(time.monotonic())
            self.last_error = describe_error(self.target, exc)
            log.warning("%s; next attempt in %.1fs", self.last_error, wait)
            raise TargetError(self.last_error) from None
        if failures := self.backoff.recovered():
            log.info(
                "%s: reconnected to %s after %d failures", self.target.name, self.server, failures
            )
        else:
            log.info("%s: connected to %s", self.target.name, self.server)
        self.last_error = None

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if self._lock is not None:
            log.warning("%s: lost the leader lock with the connection", self.target.name)
        self._lock = None
        self._role = ""
        if conn is not None and not conn.is_closed():
            conn.terminate()

    def _say(self, role: str, line: str) -> None:
        if role != self._role:  # once per change, not once per sweep
            self._role = role
            log.info("%s: %s", self.target.name, line)

    async def _lead(self, key: int, competes: bool) -> None:
        if self._lock is not None and self._lock[0] is not self.conn:
            self._lock = None  # won on a connection that is gone: never carried over
        if self._lock is not None and (not competes or self._lock[1] != key):
            # Turned dry, or a new lock_key, by a reload: leave the lock to those who act.
            await self.conn.fetchval(queries.UNLOCK, self._lock[1])
            self._lock = None
            log.info("%s: released the leader lock", self.target.name)
        if not competes:
            self._say("dry", "dry run: not competing for the leader lock")
            return
        # Session-level lock on the held connection: released by the server when
        # this connection goes away, so another instance takes over.
        if self._lock is None and await self.conn.fetchval(queries.TRY_LEAD, key):
            self._lock = (self.conn, key)
        if self._lock is not None:
            self._say("leader", "this instance acts (leader lock held)")
        else:
            self._say("observer", "another pg-watchdog instance acts; observing")

    async def sweep(self, config: Config, audit: AuditLog, dry_run: bool) -> SweepReport:
        """Connect if needed, then sweep; TargetError or AuditError on failure."""
        async with self._busy:
            return await self._sweep(config, audit, dry_run)

    async def _sweep(self, config: Config, audit: AuditLog, dry_run: bool) -> SweepReport:
        await self._ensure_connected()
        # Only an instance that may act competes; per-policy dry_run does not make it dry.
        dry = dry_run or config.dry_run
        progress = Progress()
        started = time.monotonic()
        try:
            # The budget is the server's: it stops while the audit log is written.
            async with asyncio.timeout(sweep_timeout(self.target.interval)) as budget:
                await self._lead(config.lock_key, competes=not dry)
                return await sweep_target(
                    self.conn,
                    self.server,
                    config,
                    self.target,
                    audit,
                    dry_run=dry_run,
                    # A dry instance signals nothing, so it records and reports its own
                    # would-be actions without the lock, as `once --dry-run` does.
                    leader=self.leader or dry,
                    poolers=self.poolers,
                    budget=budget,
                    progress=progress,
                )
        except AuditError:
            raise  # the disk's trouble, not the server's: connection and lock stay
        except Exception as exc:
            if not isinstance(exc, _SERVER_TROUBLE):
                # Not the server's doing: a bug of ours. Keep its traceback for the journal.
                log.exception("%s: sweep failed", self.target.name)
            self.last_error = describe_error(self.target, exc)
            await self._drop()
            # Signals that may have gone out before the trouble still reach alerts and metrics.
            done = progress.report if progress.report and progress.report.outcomes else None
            if done is not None:
                done.duration = time.monotonic() - started
            raise TargetError(self.last_error, done) from None

    # -- reload -------------------------------------------------------------------------

    @property
    def switch_pending(self) -> bool:
        """Whether the held connection was made with another DSN than the target's (a reload
        could not get in with the new one): the next reload tries again."""
        return self.up and self._dsn != self.target.dsn

    async def update(self, target: Target, lock_key: int) -> None:
        """Apply a reloaded ``target`` between two sweeps, never cancelling one.

        Interval, poolers and password_file change in place: the held connection (already
        logged in; the DSN names the role) and the leader lock stay. A new DSN is opened
        first and replaces the held connection only once it is in (make-before-break).
        """
        if target.dsn != self._dsn and self.up:
            await self._switch(target, lock_key)
        async with self._busy:
            if target.poolers != self.target.poolers:
                if self.poolers is not None:
                    await self.poolers.close()
                self.poolers = PoolerWatch(target) if target.poolers else None
            elif self.poolers is not None:
                self.poolers.retarget(target)
            if target.dsn != self.target.dsn or target.password_file != self.target.password_file:
                self.backoff.retry_now()  # new settings: the next sweep tries them at once
            self.target = target

    async def _switch(self, target: Target, lock_key: int) -> None:
        try:
            conn, server = await open_target(target)
        except TargetError as exc:
            log.warning(
                "%s; the reload keeps the connection to %s (the new dsn is used when it"
                " reconnects)",
                exc,
                self.server,
            )
            return
        async with self._busy:
            old, held = self.conn, self.leader
            key = self._lock[1] if self._lock is not None else lock_key
            self.conn, self.server, self._dsn, self._lock = conn, server, target.dsn, None
            if held:
                # Handed over at once: released here, taken there, before another instance's
                # next try (on another server the lock there is a different one anyway).
                try:
                    await old.fetchval(queries.UNLOCK, key)
                    if await conn.fetchval(queries.TRY_LEAD, key):
                        self._lock = (conn, key)
                except Exception as exc:  # the next sweep tries for the lock again
                    log.warning("%s (handing over the leader lock)", describe_error(target, exc))
            await close_quietly(old)
            if self._lock is None:
                self._role = ""
            log.info(
                "%s: reload: now connected to %s; the previous connection closed after the new"
                " one was in%s",
                target.name,
                server,
                " (leader lock carried over)" if self._lock is not None else "",
            )

    async def prepared(self, watch: PreparedWatch) -> tuple[PreparedXact, ...] | None:
        """The prepared transactions, read between two sweeps on the held connection when
        due (see PreparedWatch.poll); a reload waits for it as for a sweep."""
        async with self._busy:
            return await watch.poll(self.conn, self.target.interval, PREPARED_TIMEOUT)

    async def retire(self) -> None:
        """Close, once a sweep in flight has finished (a target removed by a reload)."""
        async with self._busy:
            await self.close()

    async def close(self) -> None:
        """Close the held connections (the target's and its poolers')."""
        if self.poolers is not None:
            await self.poolers.close()
        conn, self.conn = self.conn, None
        self._lock = None
        await close_quietly(conn)
