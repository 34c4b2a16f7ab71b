"""Where a pooler's server connections come from, as PostgreSQL sees them (``client_addr``).

The console's own address (the DSN) need not be the one PgBouncer connects to PostgreSQL
from: a second interface, a Unix socket, a name with several addresses. So the addresses are
learned from reads, as the ``client_addr`` of every backend a read attributed to the pooler.
Until a read has attributed one, they are taken from the DSN: every address its hosts
resolve to, and for a console reached through a socket directory, the local ways in (a Unix
socket, 127.0.0.1, ::1). Guessing wider would spare sessions no pooler holds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping

from watchdog.core.model import PoolerLink, Session

log = logging.getLogger("watchdog.pooler_addrs")  # the name log filters know

Addr = str | None  # a client_addr; None: a Unix socket
LOCAL: frozenset[Addr] = frozenset({None, "127.0.0.1", "::1"})
RESOLVE_EVERY = 60.0
RESOLVE_TIMEOUT = 1.0
MAX_LEARNED = 64  # a pooler has a few source addresses, never more


def dsn_hosts(dsn: str) -> list[str]:
    """The hosts (or host addresses) a libpq connection string names, as libpq reads them."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    raw = params.get("hostaddr") or params.get("host")
    if raw is None:
        raw = os.environ.get("PGHOSTADDR") or os.environ.get("PGHOST") or "/var/run/postgresql"
    return [h.strip() for h in str(raw).split(",") if h.strip()]


def _normal(addr: str) -> str | None:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).compressed
    except ValueError:
        return None


class PoolerAddrs:
    """The addresses of one pooler: learned, else guessed from its DSN."""

    def __init__(self, name: str, dsn: str) -> None:
        self.name = name
        try:
            self.hosts = dsn_hosts(dsn)
        except Exception:  # the config already checked the DSN; never fail a sweep on it
            self.hosts = []
        self.learned: set[Addr] = set()
        self._guessed: frozenset[Addr] = frozenset()
        self._resolved_at = -RESOLVE_EVERY

    def learn(self, sessions: Iterable[Session], links: Mapping[int, PoolerLink]) -> None:
        """Remember the address of every backend a fresh read attributed to this pooler."""
        for s in sessions:
            link = links.get(s.pid)
            if link is None or link.pooler != self.name or link.unknown is not None:
                continue
            if s.client_addr not in self.learned and len(self.learned) < MAX_LEARNED:
                self.learned.add(s.client_addr)
                log.info("pooler %s reaches the server from %s", self.name,
                         s.client_addr or "a Unix socket")

    def may_hold(self, addr: Addr) -> bool:
        """Whether a backend from ``addr`` may be this pooler's (any may, until one is seen)."""
        return not self.learned or addr in self.learned

    async def spared(self) -> frozenset[Addr]:
        """The addresses whose backends are spared while this pooler cannot be read."""
        if self.learned:
            return frozenset(self.learned)
        if time.monotonic() - self._resolved_at >= RESOLVE_EVERY:
            self._resolved_at = time.monotonic()
            self._guessed = await self._guess()
        return self._guessed

    async def _guess(self) -> frozenset[Addr]:
        found: set[Addr] = set()
        names: list[str] = []
        for host in self.hosts:
            if host.startswith(("/", "@")):
                found |= LOCAL
            elif (literal := _normal(host)) is not None:
                found.add(literal)
            else:
                names.append(host)
        loop = asyncio.get_running_loop()
        lookups = [loop.getaddrinfo(n, None, type=socket.SOCK_STREAM) for n in names]
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*lookups, return_exceptions=True), RESOLVE_TIMEOUT)
        except TimeoutError:
            answers = [TimeoutError()] * len(names)
        for name, infos in zip(names, answers, strict=True):
            if isinstance(infos, BaseException):
                log.warning("pooler %s: cannot resolve %s: %s", self.name, name,
                            getattr(infos, "strerror", None) or type(infos).__name__)
                continue
            found |= {_normal(str(info[4][0])) for info in infos} - {None}
        return frozenset(found)
