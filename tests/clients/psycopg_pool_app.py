"""psycopg_pool test app: a ConnectionPool of CLIENT_POOL connections (psycopg 3)."""

from __future__ import annotations

import functools

from protocol import run, settings, with_query
from psycopg_pool import ConnectionPool

dsn, size, recipe, naming = settings()
conninfo = with_query(dsn, naming)


class Sized(ConnectionPool):
    """The app's own sizing; the advised line (a ConnectionPool call) adds its settings to it."""

    __init__ = functools.partialmethod(ConnectionPool.__init__, min_size=size, max_size=size,
                                       open=True)


pool = eval(recipe, {"ConnectionPool": Sized, "conninfo": conninfo}) if recipe else Sized(conninfo)


def warm(n: int) -> list[int]:
    conns = [pool.getconn() for _ in range(n)]
    pids = [c.info.backend_pid for c in conns]
    for c in conns:
        pool.putconn(c)
    return pids


def request() -> None:
    with pool.connection() as c:
        c.execute("SELECT 1").fetchone()


run(warm, request, size, pool.close)
