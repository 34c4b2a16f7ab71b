"""Reading PgBouncer's admin console, and naming the real client behind each backend.

PgBouncer's console speaks only the simple query protocol, so this module uses psycopg 3 with
its client-side-binding cursor (asyncpg always sends the extended protocol). One command per
sweep, ``SHOW SOCKETS``: its rows are SHOW CLIENTS and SHOW SERVERS in one answer, from which
the pools' health is counted too. psycopg is an optional extra: ``pg-watchdog[pgbouncer]``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, NamedTuple

from watchdog import queries
from watchdog.config import Config, PoolerConfig
from watchdog.model import APPLICATION_NAME, PoolerClient, PoolerLink, Session

CONNECT_TIMEOUT = 2.0  # libpq counts whole seconds, at least 2
READ_TIMEOUT = 2.0
INSTALL_HINT = "pip install 'pg-watchdog[pgbouncer]' (psycopg 3)"


def psycopg_missing(config: Config) -> str | None:
    """One line saying how to get psycopg when a target names poolers and it is missing."""
    if not any(t.poolers for t in config.targets):
        return None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return f"targets name PgBouncer poolers, but psycopg is not installed: {INSTALL_HINT}"
    return None


class Socket(NamedTuple):
    """One row of SHOW SOCKETS: a client (``C``) or server (``S``) connection."""

    type: str
    user: str | None
    database: str | None
    state: str
    addr: str | None
    port: int | None
    local_addr: str | None
    local_port: int | None
    connect_time: str | None
    wait_s: float
    ptr: str
    link: str
    remote_pid: int
    application_name: str | None


@dataclass(frozen=True)
class PoolStats:
    """One pool (database, user) of a pooler, counted from its sockets."""

    database: str
    user: str
    cl_active: int = 0
    cl_waiting: int = 0
    sv_active: int = 0
    sv_idle: int = 0
    sv_used: int = 0
    maxwait_s: float = 0.0  # how long the oldest waiting client has queued


@dataclass(frozen=True)
class PoolerLook:
    """What one read of a pooler showed."""

    name: str
    sockets: tuple[Socket, ...]
    max_client_conn: int | None

    @property
    def clients(self) -> list[Socket]:
        return [s for s in self.sockets if s.type == "C"]

    @property
    def servers(self) -> list[Socket]:
        return [s for s in self.sockets if s.type == "S"]

    @property
    def clients_used(self) -> int:
        """Client connections, counted against max_client_conn."""
        return len(self.clients)

    def pools(self) -> list[PoolStats]:
        """Per (database, user): clients active and waiting, servers active, idle and used."""
        counts: dict[tuple[str, str], dict[str, float]] = {}
        for s in self.sockets:
            c = counts.setdefault((s.database or "", s.user or ""), {})
            c[s.state] = c.get(s.state, 0) + 1
            if s.state == "cl_waiting":
                c["maxwait"] = max(c.get("maxwait", 0.0), s.wait_s)
        return [
            PoolStats(
                database=db,
                user=user,
                cl_active=int(c.get("cl_active", 0)),
                cl_waiting=int(c.get("cl_waiting", 0)),
                sv_active=int(c.get("sv_active", 0)),
                sv_idle=int(c.get("sv_idle", 0)),
                sv_used=int(c.get("sv_used", 0)),
                maxwait_s=c.get("maxwait", 0.0),
            )
            for (db, user), c in sorted(counts.items())
        ]


def _int(value: Any) -> int | None:
    if type(value) is int:  # psycopg already converted it (the common case)
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_COLUMNS: tuple[str, ...] = ("type", "user", "database", "state", "addr", "port", "local_addr")
_COLUMNS += ("local_port",)
_COLUMNS += ("connect_time", "wait", "wait_us", "ptr", "link", "remote_pid", "application_name")


def _sockets(names: Sequence[str], rows: Iterable[Sequence[Any]]) -> tuple[Socket, ...]:
    """SHOW SOCKETS rows as Sockets; a column an older PgBouncer lacks reads as None."""
    col = {n: i for i, n in enumerate(names)}
    width = len(names)
    # One C-level pick per row: this runs for every client and server of a busy pooler.
    pick = itemgetter(*(col.get(n, width) for n in _COLUMNS))
    out = []
    for r in rows:
        (kind, user, db, state, addr, port, laddr, lport, ctime, wait, wait_us, ptr, link,
         pid, app) = pick((*r, None))
        out.append(Socket(
            str(kind or ""), user, db, str(state or ""), addr, _int(port), laddr, _int(lport),
            ctime, (_int(wait) or 0) + (_int(wait_us) or 0) / 1e6, str(ptr or ""),
            str(link or ""), _int(pid) or 0, app,
        ))
    return tuple(out)


async def connect_pooler(pooler: PoolerConfig) -> Any:
    """A psycopg connection to the admin console: autocommit, simple protocol, no server
    settings (PgBouncer refuses startup parameters it does not know)."""
    import psycopg

    return await psycopg.AsyncConnection.connect(
        pooler.dsn,
        autocommit=True,
        connect_timeout=int(CONNECT_TIMEOUT),
        application_name=APPLICATION_NAME,
        cursor_factory=psycopg.AsyncClientCursor,
    )


async def _show(conn: Any, command: str) -> tuple[list[str], list[Sequence[Any]]]:
    async with conn.cursor() as cur:
        await cur.execute(command)
        names = [d.name for d in cur.description or ()]
        return names, await cur.fetchall()


async def max_client_conn(conn: Any) -> int | None:
    """The pooler's max_client_conn (read once per connection: it changes only on RELOAD)."""
    _, rows = await _show(conn, queries.PGBOUNCER_CONFIG)
    return next((_int(r[1]) for r in rows if r and r[0] == "max_client_conn"), None)


async def read_pooler(conn: Any, name: str, limit: int | None) -> PoolerLook:
    """One round trip: every client and server socket of the pooler."""
    names, rows = await _show(conn, queries.PGBOUNCER_SOCKETS)
    return PoolerLook(name, _sockets(names, rows), limit)


@functools.lru_cache(maxsize=4096)  # connect times repeat (whole seconds) across sockets
def _iso(text: str | None) -> str | None:
    """PgBouncer's ``2026-12-01 22:51:09 UTC`` as ISO 8601 (other zones kept as sent)."""
    if text is None or not text.endswith(" UTC"):
        return text
    try:
        when = datetime.strptime(text[:-4], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return text
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _client(c: Socket) -> PoolerClient:
    return PoolerClient(
        addr=c.addr,
        port=c.port,
        user=c.user,
        database=c.database,
        application_name=c.application_name,
        connect_time=_iso(c.connect_time),
    )


def _port_of(server: str) -> int | None:
    return _int(server.rpartition(":")[2])


def attribute(
    looks: Iterable[PoolerLook], sessions: Iterable[Session], server: str
) -> Mapping[int, PoolerLink]:
    """The pooler link of each backend a pooler holds, by pid.

    A server socket matches a backend when its remote_pid is the backend's pid and its local
    end (address, port) is the backend's client_addr/client_port, and it connects to this
    server's port: pids and ports alone repeat across servers behind one pooler.
    """
    port = _port_of(server)
    held: dict[tuple[int, str | None, int | None], PoolerLink] = {}
    for look in looks:
        clients = {c.ptr: c for c in look.clients}
        for s in look.servers:
            if not s.remote_pid or (port is not None and s.port != port):
                continue
            client = clients.get(s.link) if s.link else None
            link = PoolerLink(look.name, None if client is None else _client(client))
            if s.addr == "unix":
                held[(s.remote_pid, None, -1)] = link
            else:
                held[(s.remote_pid, s.local_addr, s.local_port)] = link
    if not held:
        return {}
    out: dict[int, PoolerLink] = {}
    for sess in sessions:
        found = held.get((sess.pid, sess.client_addr, sess.client_port))
        if found is not None:
            out[sess.pid] = found
    return out


def real_addr(session: Session, link: PoolerLink | None) -> str | None:
    """The address of the application behind ``session``: its pooler client's, else its own."""
    if link is not None and link.client is not None and link.client.addr is not None:
        return link.client.addr
    return session.client_addr


def describe_client(link: PoolerLink | None) -> str | None:
    """``10.2.3.4:51234 via pgb1``, ``pooled by pgb1 (no client)``, or None (not pooled)."""
    if link is None:
        return None
    if link.client is None:
        return f"pooled by {link.pooler} (no client)"
    return f"{link.client.addr}:{link.client.port} via {link.pooler}"
