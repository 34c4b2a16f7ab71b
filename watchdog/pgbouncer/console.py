"""PgBouncer's admin console: what one look at a pooler shows, and the real client of each backend.

PgBouncer's console speaks only the simple query protocol, so the watchdog reads it with
psycopg 3 (asyncpg always sends the extended protocol), through watchdog.pgbouncer.read, which
bounds every answer. ``SHOW SOCKETS`` (SHOW CLIENTS and SHOW SERVERS in one answer) names the
client linked to each server connection; ``SHOW POOLS`` and ``SHOW LISTS`` count the pools'
health. psycopg is an optional extra: ``pg-watchdog[pgbouncer]``.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from watchdog.config.policy import Config, PoolerConfig
from watchdog.core.model import APPLICATION_NAME, ClientUnknown, PoolerClient, PoolerLink, Session
from watchdog.pgbouncer import rows as shapes
from watchdog.pgbouncer.read import SMALL, Caps, Console, show
from watchdog.pgbouncer.rows import PoolStats, Socket
from watchdog.text.timestamps import iso

__all__ = ["PoolStats", "PoolerLook", "Socket", "attribute"]

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


@dataclass(frozen=True)
class PoolerLook:
    """What the last reads of one pooler showed.

    ``sockets`` may come from an earlier sweep than the health figures: ``as_of`` is the
    server's time before that SHOW SOCKETS ran (None: current for every backend).
    """

    name: str
    sockets: tuple[Socket, ...]
    max_client_conn: int | None
    pool_stats: tuple[PoolStats, ...] = ()
    clients_used: int = 0  # client connections, logins included, against max_client_conn
    as_of: datetime | None = None
    dropped: int = 0  # rows of that SHOW SOCKETS that did not fit

    @property
    def clients(self) -> list[Socket]:
        return [s for s in self.sockets if s.type == "C"]

    @property
    def servers(self) -> list[Socket]:
        return [s for s in self.sockets if s.type == "S"]

    def pools(self) -> list[PoolStats]:
        """Per (database, user): clients active and waiting, servers active, idle and used."""
        return list(self.pool_stats)


async def connect_pooler(pooler: PoolerConfig) -> Console:
    """The admin console: a psycopg connection (autocommit, simple protocol, no server
    settings: PgBouncer refuses startup parameters it does not know), metered by a Relay."""
    import psycopg

    conn = await psycopg.AsyncConnection.connect(
        pooler.dsn,
        autocommit=True,
        connect_timeout=int(CONNECT_TIMEOUT),
        application_name=APPLICATION_NAME,
        cursor_factory=psycopg.AsyncClientCursor,
    )
    try:
        return Console(conn)
    except BaseException:
        await conn.close()
        raise


async def max_client_conn(console: Console) -> int | None:
    """The pooler's max_client_conn (read once per connection: it changes only on RELOAD)."""
    return shapes.max_client_conn(await show(console, shapes.CONFIG, SMALL))


async def read_sockets(console: Console, limit: int | None) -> shapes.Rows[Socket]:
    """Every client and server socket of the pooler, within the caps its limit allows."""
    return await show(console, shapes.SOCKETS, Caps.for_clients(limit))


@dataclass(frozen=True)
class Health:
    """The pools that hold anyone (SHOW POOLS) and the clients in use (SHOW LISTS)."""

    pools: tuple[PoolStats, ...]
    clients_used: int
    dropped: int  # rows of those answers that did not fit


async def read_health(console: Console, limit: int | None) -> Health:
    """The pools' health: two answers of a few rows, whatever the number of connections."""
    pools = await show(console, shapes.POOLS, Caps.for_clients(limit))
    lists = await show(console, shapes.LISTS, SMALL)
    return Health(tuple(p for p in pools.rows if not p.empty), shapes.used_clients(lists),
                  pools.dropped + lists.dropped)


@functools.lru_cache(maxsize=4096)  # connect times repeat (whole seconds) across sockets
def _iso(text: str | None) -> str | None:
    """PgBouncer's ``2026-12-01 22:51:09 UTC`` as ISO 8601 (other zones kept as sent)."""
    if text is None or not text.endswith(" UTC"):
        return text
    try:
        when = datetime.strptime(text[:-4], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return text
    return iso(when)


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
    port = server.rpartition(":")[2]
    return int(port) if port.isdigit() else None


def covers(as_of: datetime | None, session: Session) -> bool:
    """Whether an answer read at server time ``as_of`` can still name ``session``'s client.

    PgBouncer links a server to another client only when that client starts a statement or a
    transaction (a new state_change, and a new xact_start), and a pid names another backend
    only after a new backend_start. A backend unchanged since ``as_of`` has the same link.
    """
    if as_of is None:
        return True
    if session.backend_start is None or session.backend_start > as_of:
        return False
    if session.state_change is not None and session.state_change <= as_of:
        return True
    return session.xact_start is not None and session.xact_start <= as_of


def attribute(
    looks: Iterable[PoolerLook], sessions: Iterable[Session], server: str
) -> dict[int, PoolerLink]:
    """The pooler link of each backend a pooler holds, by pid.

    A server socket matches a backend when its remote_pid is the backend's pid and its local
    end (address, port) is the backend's client_addr/client_port, and it connects to this
    server's port: pids and ports alone repeat across servers behind one pooler. An answer
    older than the sweep names only the backends it :func:`covers`.
    """
    port = _port_of(server)
    held: dict[tuple[int, str | None, int | None], tuple[PoolerLink, datetime | None]] = {}
    for look in looks:
        clients = {c.ptr: c for c in look.clients}
        for s in look.servers:
            if not s.remote_pid or (port is not None and s.port != port):
                continue
            client = clients.get(s.link) if s.link else None
            if s.link and client is None:
                # Linked to a client row that was dropped: who it is cannot be told.
                link = PoolerLink(look.name, None, ClientUnknown.INCOMPLETE)
            else:
                link = PoolerLink(look.name, None if client is None else _client(client))
            if s.addr == "unix":
                held[(s.remote_pid, None, -1)] = (link, look.as_of)
            else:
                held[(s.remote_pid, s.local_addr, s.local_port)] = (link, look.as_of)
    if not held:
        return {}
    out: dict[int, PoolerLink] = {}
    for sess in sessions:
        found = held.get((sess.pid, sess.client_addr, sess.client_port))
        if found is not None and covers(found[1], sess):
            out[sess.pid] = found[0]
    return out


def unknown_links(
    sessions: Iterable[Session],
    links: Mapping[int, PoolerLink],
    blind: Mapping[str, tuple[ClientUnknown, Collection[str | None]]],
) -> dict[int, PoolerLink]:
    """``links`` plus an unknown link for every other backend from the address of a pooler in
    ``blind`` (name -> why, its addresses as the server sees them; None: a Unix socket)."""
    if not blind:
        return dict(links)
    out = dict(links)
    for sess in sessions:
        if sess.pid in out:
            continue
        for name, (why, addrs) in blind.items():
            if sess.client_addr in addrs:
                out[sess.pid] = PoolerLink(name, None, why)
                break
    return out
