"""Small async helpers for tests that talk to a TempCluster (``from helpers import connect``)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from watchdog.tempcluster import TempCluster
from watchdog.tempcluster import free_port as _free_port


async def connect(cluster: TempCluster, user: str = "postgres",
                  application_name: str | None = None, database: str = "postgres",
                  timeout: float = 10, **kwargs: Any) -> asyncpg.Connection:
    """An asyncpg connection to ``cluster`` (trust auth over TCP). Close it yourself."""
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
