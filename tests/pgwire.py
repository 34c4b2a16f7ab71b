"""A tiny PostgreSQL wire-protocol client for tests that need to pick the client's source address.

Neither asyncpg nor libpq can bind the source address of a connection. Behind PgBouncer the
tests need clients with a known, distinct address (127.0.0.3 while PgBouncer reaches PostgreSQL
from 127.0.0.1), and the exact socket address to compare with the audit record. Trust auth only;
simple query protocol only.
"""

from __future__ import annotations

import asyncio
import socket
import struct


class WireError(Exception):
    """The server answered with an ErrorResponse, or the connection broke."""


class WireClient:
    """One client connection; ``await WireClient.connect(...)``, then ``query``/``send``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        host, port = writer.get_extra_info("sockname")[:2]
        self.addr: str = host
        self.port: int = port

    @classmethod
    async def connect(cls, port: int, user: str, database: str, *, source: str = "127.0.0.1",
                      host: str = "127.0.0.1", application_name: str = "wire") -> WireClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock)
        client = cls(reader, writer)
        params = b"".join(
            k.encode() + b"\0" + v.encode() + b"\0"
            for k, v in (("user", user), ("database", database),
                         ("application_name", application_name))
        ) + b"\0"
        body = struct.pack("!i", 196608) + params
        writer.write(struct.pack("!i", len(body) + 4) + body)
        await client._until_ready()
        return client

    async def _message(self) -> tuple[bytes, bytes]:
        try:
            head = await self.reader.readexactly(5)
            kind, length = head[:1], struct.unpack("!i", head[1:])[0]
            return kind, await self.reader.readexactly(length - 4)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise WireError(f"connection lost: {exc!r}") from None

    async def _until_ready(self) -> None:
        error: bytes | None = None
        while True:
            kind, body = await self._message()
            if kind == b"E":
                error = body
            elif kind == b"Z":
                if error is not None:
                    raise WireError(error.decode(errors="replace"))
                return

    def send(self, sql: str) -> None:
        """Send a simple query without waiting for its result (e.g. pg_sleep)."""
        body = sql.encode() + b"\0"
        self.writer.write(b"Q" + struct.pack("!i", len(body) + 4) + body)

    async def query(self, sql: str, timeout: float = 30) -> None:
        """Run ``sql`` and wait for the server to be ready again."""
        self.send(sql)
        await asyncio.wait_for(self._until_ready(), timeout)

    async def alive(self) -> bool:
        """Whether the connection still answers a query."""
        try:
            await self.query("SELECT 1", timeout=10)
        except (WireError, TimeoutError, OSError):
            return False
        return True

    def close(self) -> None:
        self.writer.close()
