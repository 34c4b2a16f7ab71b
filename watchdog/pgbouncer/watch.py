"""The poolers of one target: a held admin-console connection each, when to read, what to spare.

A pooler that is down, slow or answers nonsense never fails the target's sweep: its reads are
bounded (watchdog.pgbouncer.read), a failed connect waits out a jittered backoff, and while it
cannot be read the backends from its address are spared (their real client is unknown).

SHOW SOCKETS costs PgBouncer a pass over every connection in its single thread, so it runs
only when a sweep has a candidate backend from the pooler's address (watchdog.core.candidates),
and at most once a second: within that second the last answer is reused for the backends it
still covers. The pools' health (SHOW POOLS and SHOW LISTS, a few rows) is read once per
interval of the target.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from watchdog.config.policy import PoolerConfig, Target
from watchdog.core import backoff
from watchdog.core.candidates import Candidate
from watchdog.core.model import ClientUnknown, PoolerLink, Snapshot
from watchdog.pg.connect import dsn_passwords, scrub
from watchdog.pgbouncer.addrs import Addr, PoolerAddrs
from watchdog.pgbouncer.console import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    Health,
    PoolerLook,
    Socket,
    attribute,
    connect_pooler,
    covers,
    max_client_conn,
    read_health,
    read_sockets,
    unknown_links,
)
from watchdog.pgbouncer.read import Console, printable
from watchdog.text.errors import reason as error_reason

log = logging.getLogger("watchdog.pooler_watch")  # the name log filters know

# All of one pooler's work in a sweep (connect, SHOW CONFIG, SHOW SOCKETS, SHOW POOLS, SHOW
# LISTS, a wait for the rate limit): well inside the shortest sweep timeout (5 s), so a hung
# pooler can never time the target's sweep out.
BUDGET = 3.0
GAP = 1.0  # seconds between two SHOW SOCKETS of one pooler, at least


@dataclass(frozen=True)
class PoolerRound:
    """One sweep's view of a target's poolers: the looks that work, the errors of the others,
    and the pooler link of each backend (spared ones included)."""

    looks: tuple[PoolerLook, ...] = ()
    errors: dict[str, str] = field(default_factory=dict)
    links: Mapping[int, PoolerLink] = field(default_factory=dict)
    read: frozenset[str] = frozenset()  # poolers whose SHOW SOCKETS ran in this round
    dropped: dict[str, int] = field(default_factory=dict)  # rows dropped in this round


def describe_pooler_error(target: str, pooler: PoolerConfig, exc: BaseException) -> str:
    """One safe line (no password) about why ``pooler`` failed."""
    # The console may have written it: one printable line, whatever it sent.
    reason = printable(error_reason(exc))
    return scrub(f"{target}: pooler {pooler.name}: {reason}", dsn_passwords(pooler.dsn))


class _Held:
    def __init__(self, pooler: PoolerConfig) -> None:
        self.pooler = pooler
        self.conn: Console | None = None
        self.limit: int | None = None
        self.backoff = backoff.Backoff()
        self.last_error: str | None = None  # set while the pooler cannot be read
        self.tried = False  # this round connected to it or failed trying
        self.addrs = PoolerAddrs(pooler.name, pooler.dsn)
        self.sockets: tuple[Socket, ...] | None = None
        self.as_of: datetime | None = None
        self.sockets_dropped = 0
        self.sockets_at = -GAP  # monotonic time of the last SHOW SOCKETS attempt
        self.health: Health | None = None
        self.health_at = float("-inf")
        self.dropping = False

    @property
    def up(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def error(self) -> str | None:
        """Why it cannot be read; "(retrying)" when this round did not try it again."""
        if self.last_error is None:
            return None
        return self.last_error if self.tried else f"{self.last_error} (retrying)"

    def look(self, fresh: bool) -> PoolerLook | None:
        if self.last_error is not None or self.health is None:
            return None
        # A SHOW SOCKETS of this round names every backend of this round's snapshot (taken
        # before it); an earlier one only those it covers.
        as_of = None if fresh else self.as_of
        return PoolerLook(self.pooler.name, self.sockets or (), self.limit, self.health.pools,
                          self.health.clients_used, as_of, self.sockets_dropped)

    async def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()


def _plan(h: _Held, mine: Sequence[Candidate], now: float) -> tuple[bool, float]:
    """(read SHOW SOCKETS now?, seconds to wait first) for candidates from ``h``'s address."""
    if not mine:
        return False, 0.0
    since = now - h.sockets_at
    usable = h.sockets is not None and h.last_error is None
    if usable and since < GAP and all(covers(h.as_of, c.session) for c in mine):
        return False, 0.0
    if since >= GAP:
        return True, 0.0
    # Within a second of the last read: only a backend the last answer cannot speak for and
    # that a policy may act on now makes this sweep wait for the next read.
    if h.up and any(c.due_now and not (usable and covers(h.as_of, c.session)) for c in mine):
        return True, GAP - since
    return False, 0.0


class PoolerWatch:
    """Reads the poolers of one target, concurrently, each within BUDGET."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._held = {p.name: _Held(p) for p in target.poolers}
        self.health_every = max(GAP, target.interval)

    def retarget(self, target: Target) -> None:
        """The same poolers under a reloaded target (its interval paces the health reads)."""
        self.target = target
        self.health_every = max(GAP, target.interval)

    def up(self) -> dict[str, bool]:
        """Whether each pooler's connection is open."""
        return {name: h.up for name, h in self._held.items()}

    async def _ensure(self, h: _Held) -> Console:
        if h.conn is not None and not h.conn.closed:
            return h.conn
        await h.drop()
        if h.backoff.waiting(time.monotonic()):
            raise _Waiting
        h.conn = conn = await asyncio.wait_for(connect_pooler(h.pooler), CONNECT_TIMEOUT + 0.5)
        h.limit = await asyncio.wait_for(max_client_conn(conn), READ_TIMEOUT)
        log.info("%s: connected to pooler %s", self.target.name, h.pooler.name)
        return conn

    async def _one(self, h: _Held, snapshot: Snapshot | None,
                   wanted: Sequence[Candidate] | None) -> int:
        """Bring ``h`` up to date for this round; the rows dropped. Never raises Exception."""
        now = time.monotonic()
        h.tried = False
        if wanted is None:  # status, benchmarks: everything, answers under a second reused
            sockets, wait = h.sockets is None or now - h.sockets_at >= GAP, 0.0
            health = h.health is None or now - h.health_at >= GAP
        elif h.last_error is not None:
            # A pooler that failed is tried again in full once its backoff is over: it answers
            # again only when every read works (a console that answers SHOW POOLS but not SHOW
            # SOCKETS stays one error, alerted once).
            sockets, health, wait = True, True, 0.0
        else:
            mine = [c for c in wanted if h.addrs.may_hold(c.session.client_addr)]
            sockets, wait = _plan(h, mine, now)
            health = h.health is None or now - h.health_at >= self.health_every
        if not (sockets or health):
            return 0
        dropped = 0
        try:
            async with asyncio.timeout(BUDGET):
                if wait > 0:
                    await asyncio.sleep(wait)
                conn = await self._ensure(h)
                h.tried = True
                if sockets:
                    h.sockets_at = time.monotonic()
                    h.sockets = None  # a failed read leaves no answer behind
                    rows = await asyncio.wait_for(read_sockets(conn, h.limit), READ_TIMEOUT)
                    h.sockets, h.sockets_dropped = tuple(rows.rows), rows.dropped
                    h.as_of = None if snapshot is None else snapshot.now
                    dropped += rows.dropped
                if health:
                    h.health_at = time.monotonic()
                    h.health = await asyncio.wait_for(read_health(conn, h.limit), READ_TIMEOUT)
                    dropped += h.health.dropped
        except _Waiting:
            return 0
        except Exception as exc:  # psycopg, OSError, timeouts, answers that do not fit
            h.tried = True
            await self._fail(h, exc)
            return 0
        if failures := h.backoff.recovered():
            log.info("%s: pooler %s answers again after %d failures", self.target.name,
                     h.pooler.name, failures)
        h.last_error = None
        return dropped

    async def _fail(self, h: _Held, exc: Exception) -> None:
        await h.drop()
        h.sockets, h.health = None, None
        wait = h.backoff.failed(time.monotonic())
        h.last_error = describe_pooler_error(self.target.name, h.pooler, exc)
        log.warning("%s; next attempt in %.1fs", h.last_error, wait)

    async def read(
        self, snapshot: Snapshot | None = None, server: str = "",
        wanted: Sequence[Candidate] | None = None,
    ) -> PoolerRound:
        """Every pooler's look, and the links of ``snapshot``'s backends; never raises.

        ``wanted``: the sweep's candidates (watchdog.core.candidates); None reads every pooler.
        """
        if not self._held:
            return PoolerRound()
        held = list(self._held.values())
        before = {h.pooler.name: h.sockets_at for h in held}
        counts = await asyncio.gather(*(self._one(h, snapshot, wanted) for h in held))
        fresh = frozenset(h.pooler.name for h in held
                          if h.sockets_at != before[h.pooler.name] and h.sockets is not None)
        looks = tuple(look for h in held if (look := h.look(h.pooler.name in fresh)) is not None)
        errors = {h.pooler.name: e for h in held if (e := h.error()) is not None}
        dropped = {h.pooler.name: n for h, n in zip(held, counts, strict=True) if n}
        for h in held:
            if h.pooler.name in fresh:
                self._note_drops(h, h.sockets_dropped > 0)
        links: Mapping[int, PoolerLink] = {}
        if snapshot is not None:
            links = await self._links(held, looks, snapshot, server, fresh)
        return PoolerRound(looks, errors, links, fresh, dropped)

    async def _links(self, held: list[_Held], looks: tuple[PoolerLook, ...], snapshot: Snapshot,
                     server: str, fresh: frozenset[str]) -> dict[int, PoolerLink]:
        links = attribute(looks, snapshot.sessions, server)
        for h in held:
            if h.pooler.name in fresh:
                h.addrs.learn(snapshot.sessions, links)
        blind: dict[str, tuple[ClientUnknown, frozenset[Addr]]] = {}
        for h in held:
            if h.last_error is not None:
                blind[h.pooler.name] = (ClientUnknown.UNREADABLE, await h.addrs.spared())
            elif h.sockets_dropped and h.sockets is not None:
                blind[h.pooler.name] = (ClientUnknown.INCOMPLETE, await h.addrs.spared())
        return unknown_links(snapshot.sessions, links, blind)

    def _note_drops(self, h: _Held, now_dropping: bool) -> None:
        """Log once when a pooler's answers start to lose rows (the metric counts each)."""
        if now_dropping and not h.dropping:
            log.warning("%s: pooler %s: rows of its answer did not fit and were dropped; backends"
                        " from its address without a row are spared", self.target.name,
                        h.pooler.name)
        h.dropping = now_dropping

    async def close(self) -> None:
        """Close every held connection."""
        await asyncio.gather(*(h.drop() for h in self._held.values()))


class _Waiting(Exception):
    """The pooler is down and its next connect attempt is not due yet."""
