"""A cancellation between connecting and learning the server's address (shutdown, a reload,
a timeout around the caller) drops the new connection instead of leaking a server slot.

A small TCP proxy in front of a real server forwards the login, then holds back the client's
next statement (the server-address query), so open_target is cancelled exactly there."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from helpers import connect, proxy_login, wait_for
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import Target
from watchdog.pg import queries
from watchdog.pg.connect import close_quietly, open_target


class HoldingProxy:
    """Forwards both ways until the client sends bytes holding ``marker``; from then on it
    forwards nothing more from that client (the statement never reaches the server)."""

    def __init__(self, upstream: tuple[str, int], marker: bytes) -> None:
        self.upstream, self.marker = upstream, marker
        self.held = asyncio.Event()
        self.client_closed = asyncio.Event()
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        proxy_login(self.port, self.upstream[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        proxy_login(self.port, None)
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, client: bool) -> None:
            while data := await src.read(65536):
                if client and (self.held.is_set() or self.marker in data):
                    self.held.set()
                    continue
                dst.write(data)
                await dst.drain()
            if client:
                self.client_closed.set()

        tasks = [
            asyncio.create_task(pump(reader, up_writer, True)),
            asyncio.create_task(pump(up_reader, writer, False)),
        ]
        self._tasks.update(tasks)
        try:
            await tasks[0]
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()
            tasks[1].cancel()


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    return pg


async def _watchdog_backends(cluster: TempCluster) -> int:
    conn = await connect(cluster, "postgres", "psql")
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg-watchdog'"
        )
        return n
    finally:
        await conn.close()


async def test_cancelled_between_connect_and_server_address_drops_the_connection(
    cluster: TempCluster,
) -> None:
    marker = queries.SERVER_ADDR.strip().splitlines()[0].encode()
    async with HoldingProxy((cluster.host, cluster.port), marker) as proxy:
        dsn = f"postgresql://watchdog@127.0.0.1:{proxy.port}/postgres"
        target = Target(name="main", dsn=dsn, password_file=None, interval=1.0)
        task = asyncio.create_task(open_target(target))
        await asyncio.wait_for(proxy.held.wait(), 10)  # logged in; the address query held
        assert await _watchdog_backends(cluster) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The caller still holds the cancelled task (and its traceback): nothing but the
        # connection's own closing may free the slot.
        await asyncio.wait_for(proxy.client_closed.wait(), 10)
        await _gone(cluster)


async def _gone(cluster: TempCluster) -> None:
    async def none_left() -> bool:
        return await _watchdog_backends(cluster) == 0

    await wait_for(none_left, timeout=10, what="the watchdog's backend to go")


async def test_cancelled_close_quietly_still_drops_the_connection(cluster: TempCluster) -> None:
    async with HoldingProxy((cluster.host, cluster.port), b"\0never\0") as proxy:
        dsn = f"postgresql://watchdog@127.0.0.1:{proxy.port}/postgres"
        target = Target(name="main", dsn=dsn, password_file=None, interval=1.0)
        conn, _ = await open_target(target)
        proxy.held.set()
        task = asyncio.create_task(close_quietly(conn))
        await asyncio.sleep(0.3)  # closing: the goodbye never reaches the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert conn.is_closed()
        await asyncio.wait_for(proxy.client_closed.wait(), 10)
        await _gone(cluster)
