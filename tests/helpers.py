"""Small async helpers for tests that talk to a TempCluster (``from helpers import connect``)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from watchdog.commands.demo import tempauth
from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.commands.demo.tempcluster import free_port as _free_port


async def connect(cluster: TempCluster, user: str = "postgres",
                  application_name: str | None = None, database: str = "postgres",
                  timeout: float = 10, **kwargs: Any) -> asyncpg.Connection:
    """An asyncpg connection to ``cluster`` over TCP (the password from PGPASSFILE). Close
    it yourself."""
    server_settings = dict(kwargs.pop("server_settings", None) or {})
    if application_name is not None:
        server_settings["application_name"] = application_name
    return await asyncpg.connect(cluster.dsn(user, database), timeout=timeout,
                                 server_settings=server_settings or None, **kwargs)


async def wait_for(predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
                   timeout: float = 10, interval: float = 0.05, what: str = "") -> None:
    """Poll ``predicate`` (sync or async) until truthy; AssertionError after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"timed out waiting for {what or repr(predicate)} ({timeout:g} s)")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    return _free_port()


def proxy_login(port: int, upstream_port: int | None) -> None:
    """Clients reaching a server through a proxy on ``port`` log in with the server's password
    (from the passfile); ``upstream_port`` None: the proxy is gone, forget its port."""
    password = tempauth.password_for(upstream_port) if upstream_port is not None else None
    if password is None:
        tempauth.forget(port)
    else:
        tempauth.remember(port, password)


_SWEEPS = (
    "SELECT pid, query_start FROM pg_stat_activity"
    " WHERE application_name = 'pg-watchdog' AND left(query, 120) = left($1, 120)"
)


async def sweeps_ran(cluster: TempCluster, n: int, timeout: float = 60) -> None:
    """Wait until pg-watchdog's connections to ``cluster`` have started ``n`` new snapshots.

    Proof that sweeps ran, for tests that then assert nothing happened. Each snapshot
    statement gets a new query_start in pg_stat_activity; they are polled every 20 ms,
    far more often than the 250 ms floor between two sweeps of one target.
    """
    from watchdog.pg import queries

    conn = await connect(cluster, "postgres", "psql")
    try:
        seen = {tuple(r) for r in await conn.fetch(_SWEEPS, queries.SNAPSHOT)}
        new: set[tuple[object, ...]] = set()

        async def enough() -> bool:
            new.update(tuple(r) for r in await conn.fetch(_SWEEPS, queries.SNAPSHOT))
            new.difference_update(seen)
            return len(new) >= n

        await wait_for(enough, timeout=timeout, interval=0.02, what=f"{n} new sweeps")
    finally:
        await conn.close()
