"""The poolers of one target: a held admin-console connection each, reconnect backoff, reads.

A pooler that is down or slow never fails the target's sweep: its read is bounded by a short
timeout, a failed connect waits out a jittered backoff, and the sweep goes on without that
pooler's attribution (its error is reported instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from watchdog.config import PoolerConfig, Target
from watchdog.connect import dsn_passwords, scrub
from watchdog.pooler import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    PoolerLook,
    connect_pooler,
    max_client_conn,
    read_pooler,
)

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# All of one pooler's work in a sweep (connect, SHOW CONFIG, SHOW SOCKETS): well inside the
# shortest sweep timeout (5 s), so a hung pooler can never time the target's sweep out.
BUDGET = 3.0


@dataclass(frozen=True)
class PoolerRound:
    """One read of every pooler of a target: the looks that worked, the errors of the others."""

    looks: tuple[PoolerLook, ...] = ()
    errors: dict[str, str] = field(default_factory=dict)


def describe_pooler_error(target: str, pooler: PoolerConfig, exc: BaseException) -> str:
    """One safe line (no password) about why ``pooler`` failed."""
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    elif isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        # libpq's messages run over several lines; the first one says what happened.
        lines = str(exc).strip().splitlines()
        reason = lines[0].strip() if lines else type(exc).__name__
    return scrub(f"{target}: pooler {pooler.name}: {reason}", dsn_passwords(pooler.dsn))


class _Held:
    def __init__(self, pooler: PoolerConfig) -> None:
        self.pooler = pooler
        self.conn: Any = None
        self.limit: int | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: str | None = None

    @property
    def up(self) -> bool:
        return self.conn is not None and not self.conn.closed

    async def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1)


class PoolerWatch:
    """Reads the poolers of one target, concurrently, each within READ_TIMEOUT."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._held = {p.name: _Held(p) for p in target.poolers}

    def up(self) -> dict[str, bool]:
        """Whether each pooler's connection is open."""
        return {name: h.up for name, h in self._held.items()}

    async def _look(self, h: _Held) -> PoolerLook:
        if not h.up:
            if time.monotonic() < h.retry_at:
                raise _Waiting(h.last_error or "down")
            h.conn = await asyncio.wait_for(connect_pooler(h.pooler), CONNECT_TIMEOUT + 0.5)
            h.limit = await asyncio.wait_for(max_client_conn(h.conn), READ_TIMEOUT)
            if h.failures:
                log.info(
                    "%s: pooler %s reachable again after %d failures",
                    self.target.name,
                    h.pooler.name,
                    h.failures,
                )
            else:
                log.info("%s: connected to pooler %s", self.target.name, h.pooler.name)
            h.failures, h.last_error = 0, None
        return await asyncio.wait_for(read_pooler(h.conn, h.pooler.name, h.limit), READ_TIMEOUT)

    async def _one(self, h: _Held) -> PoolerLook | str:
        try:
            return await asyncio.wait_for(self._look(h), BUDGET)
        except _Waiting as exc:
            return f"{exc} (retrying)"
        except Exception as exc:  # psycopg, OSError, timeouts: all mean "no attribution now"
            await h.drop()
            h.failures += 1
            delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(h.failures, 16))
            h.retry_at = time.monotonic() + random.uniform(delay / 2, delay)
            h.last_error = describe_pooler_error(self.target.name, h.pooler, exc)
            log.warning("%s; next attempt in %.1fs", h.last_error, h.retry_at - time.monotonic())
            return h.last_error

    async def read(self) -> PoolerRound:
        """Every pooler's sockets; never raises (a failed pooler is an entry in ``errors``)."""
        if not self._held:
            return PoolerRound()
        held = list(self._held.values())
        results = await asyncio.gather(*(self._one(h) for h in held))
        looks = tuple(r for r in results if isinstance(r, PoolerLook))
        errors = {
            h.pooler.name: r for h, r in zip(held, results, strict=True) if isinstance(r, str)
        }
        return PoolerRound(looks, errors)

    async def close(self) -> None:
        """Close every held connection."""
        await asyncio.gather(*(h.drop() for h in self._held.values()))


class _Waiting(Exception):
    """The pooler is down and its next connect attempt is not due yet."""
