"""Host name lookups of the service in a thread pool of their own, one lookup per name at a time.

asyncio resolves names with the blocking ``socket.getaddrinfo`` in the loop's default
executor, the pool ``asyncio.to_thread`` uses too. A lookup cannot be cancelled: a connection
attempt that times out leaves its thread blocked until the resolver gives up (``timeout`` x
``attempts`` of resolv.conf). A few targets behind a dead DNS server, retrying, would fill that
pool and stall every other target's work queued there. Here each name holds at most one
thread however often its target retries, and the default executor is left alone.
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

THREADS = 16  # distinct names that may hang at once before other lookups queue

_Key = tuple[Any, Any, int, int, int, int]


class Resolver:
    """``loop.getaddrinfo`` on a dedicated pool, shared by concurrent lookups of one name."""

    def __init__(self, threads: int = THREADS) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pg-watchdog-dns")
        self._pending: dict[_Key, asyncio.Future[Any]] = {}

    async def getaddrinfo(
        self, host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0,
        flags: int = 0,
    ) -> Any:
        """What ``socket.getaddrinfo`` returns; a caller that gives up leaves the lookup running
        for the next caller of the same name."""
        key = (host, port, family, type, proto, flags)
        future = self._pending.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self.pool, socket.getaddrinfo, *key)
            self._pending[key] = future
            future.add_done_callback(lambda f: self._settled(key, f))
        # Shielded: a timed-out connection attempt must not cancel the lookup others wait for.
        return await asyncio.shield(future)

    def _settled(self, key: _Key, future: asyncio.Future[Any]) -> None:
        self._pending.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: every caller may have given up on it

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Route ``loop``'s name lookups (asyncpg's included) through this resolver."""
        loop.getaddrinfo = self.getaddrinfo  # type: ignore[method-assign]

    def close(self) -> None:
        """Stop the pool without waiting for lookups still blocked in it."""
        self.pool.shutdown(wait=False, cancel_futures=True)
