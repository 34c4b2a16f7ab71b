"""A tiny PostgreSQL wire-protocol client, and a fake PgBouncer console (``python pgwire.py``).

The client: neither asyncpg nor libpq can bind the source address of a connection. Behind
PgBouncer the tests need clients with a known, distinct address (127.0.0.3 while PgBouncer
reaches PostgreSQL from 127.0.0.1), and the exact socket address to compare with the audit
record. SCRAM-SHA-256 (the password from this process's passfile, see
watchdog.commands.demo.tempauth) or
trust; simple query protocol only.

The console (``FakeConsole``, run as its own process): it answers the SHOW commands the
watchdog sends the way a broken or hostile pooler would (see ``MODES``), and logs every
query it receives, one line each, so tests count reads exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from watchdog.commands.demo import tempauth


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
                      host: str = "127.0.0.1", application_name: str = "wire",
                      password: str | None = None) -> WireClient:
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
        await client._login(password if password is not None else tempauth.password_for(port))
        await client._until_ready()
        return client

    async def _login(self, password: str | None) -> None:
        """Answer the server's authentication requests (RFC 5802 SCRAM, no channel binding)
        until AuthenticationOk."""
        nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        first_bare = f"n=,r={nonce}"
        expected = b""
        while True:
            kind, body = await self._message()
            if kind == b"E":
                raise WireError(body.decode(errors="replace"))
            code = struct.unpack("!i", body[:4])[0] if kind == b"R" else -1
            if code == 0:
                return
            if code == 10 and password is not None:  # AuthenticationSASL: start
                first = f"n,,{first_bare}".encode()
                payload = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
            elif code == 11 and password is not None:  # AuthenticationSASLContinue
                server_first = body[4:].decode()
                attrs = dict(item.split("=", 1) for item in server_first.split(","))
                if not attrs["r"].startswith(nonce):
                    raise WireError("SCRAM: the server's nonce does not extend ours")
                salted = hashlib.pbkdf2_hmac("sha256", password.encode(),
                                             base64.b64decode(attrs["s"]), int(attrs["i"]))
                client_key = hmac.digest(salted, b"Client Key", "sha256")
                without_proof = f"c=biws,r={attrs['r']}"
                message = f"{first_bare},{server_first},{without_proof}".encode()
                signature = hmac.digest(hashlib.sha256(client_key).digest(), message, "sha256")
                proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
                server_key = hmac.digest(salted, b"Server Key", "sha256")
                expected = b"v=" + base64.b64encode(hmac.digest(server_key, message, "sha256"))
                payload = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
            elif code == 12:  # AuthenticationSASLFinal: the server knew the password too
                if body[4:] != expected:
                    raise WireError("SCRAM: the server's signature does not match")
                continue
            else:
                raise WireError(f"cannot answer authentication request {kind!r} {code}")
            self.writer.write(b"p" + struct.pack("!i", len(payload) + 4) + payload)

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


# -- the fake console -------------------------------------------------------------------------

SOCKET_COLUMNS = ("type", "user", "database", "state", "addr", "port", "local_addr", "local_port",
                  "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link",
                  "remote_pid", "tls", "application_name")
MODES = {
    "good": "answers as PgBouncer would, with the rows of --sockets (a JSON list of objects)",
    "wrong-types": "SHOW SOCKETS declares odd column types and sends rows of every wrong kind",
    "endless": "SHOW SOCKETS streams valid-looking rows without end",
    "hang": "SHOW SOCKETS sends its columns and half a row, then nothing, connection open",
    "giant": "SHOW SOCKETS sends one row announced as 1 GB, its bytes as fast as it can",
    "missing": "SHOW SOCKETS lacks the remote_pid column",
    "huge": "SHOW SOCKETS sends --rows valid rows (a pooler far bigger than any real one)",
}


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _columns(names: tuple[str, ...], oids: dict[str, int] | None = None) -> bytes:
    body = struct.pack("!h", len(names))
    for n in names:
        oid = (oids or {}).get(n, 23 if n in ("port", "local_port", "remote_pid", "wait") else 25)
        body += n.encode() + b"\0" + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0)
    return _msg(b"T", body)


def _row(values: list[Any]) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            body += struct.pack("!i", -1)
        else:
            raw = v if isinstance(v, bytes) else str(v).encode()
            body += struct.pack("!i", len(raw)) + raw
    return _msg(b"D", body)


def _socket_row(fields: dict[str, Any]) -> bytes:
    base: dict[str, Any] = {"type": "C", "user": "app", "database": "postgres",
                            "state": "cl_active", "addr": "127.0.0.3", "port": 40000,
                            "local_addr": "127.0.0.1", "local_port": 6432,
                            "connect_time": "2026-12-01 10:00:00 UTC",
                            "request_time": "2026-12-01 10:00:00 UTC", "wait": 0, "wait_us": 0,
                            "close_needed": 0, "ptr": "0x1", "link": "", "remote_pid": 0,
                            "tls": "", "application_name": "app"}
    base.update(fields)
    return _row([base[c] for c in SOCKET_COLUMNS])


def _done(tag: str) -> bytes:
    return _msg(b"C", tag.encode() + b"\0") + _msg(b"Z", b"I")


WRONG = [  # each breaks one column; the console's own client row stays valid
    {"port": "abc"}, {"port": 99999}, {"remote_pid": "1e9"}, {"remote_pid": '{"a": 1}'},
    {"type": "Q"}, {"ptr": "'; DROP TABLE x"}, {"link": "0xnothex"}, {"addr": "999.1.1.1"},
    {"local_addr": None}, {"state": "sv\nactive"}, {"application_name": "x" * 5000},
    {"port": None}, {"local_port": "-1"}, {"remote_pid": "12345678901234567890"},
]


class FakeConsole:
    """The console's behaviour; one instance serves every connection."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log = Path(args.log)
        # Encoded before it listens: the console then sends as fast as the socket takes it.
        self.huge = b"".join(_socket_row({"ptr": f"0x{i + 4096:x}", "port": 1024 + i % 60000})
                             for i in range(args.rows if args.mode == "huge" else 0))

    def _sockets(self) -> list[dict[str, Any]]:
        own = {"type": "C", "user": "watchdog", "database": "pgbouncer", "ptr": "0xa0"}
        rows: list[dict[str, Any]] = [own]
        if self.args.sockets and Path(self.args.sockets).exists():
            rows += json.loads(Path(self.args.sockets).read_text())
        return rows

    async def answer(self, sql: str, w: asyncio.StreamWriter) -> None:
        with self.log.open("a") as f:
            f.write(sql.strip() + "\n")
        mode, command = self.args.mode, sql.strip().rstrip(";").upper()
        if command == "SHOW CONFIG":
            w.write(_columns(("key", "value", "default", "changeable")))
            w.write(_row(["max_client_conn", self.args.max_client_conn, "100", "yes"]))
            w.write(_row(["pool_mode", "session", "session", "yes"]))
            w.write(_done("SHOW"))
        elif command == "SHOW LISTS":
            w.write(_columns(("list", "items")))
            w.write(_row(["used_clients", len(self._sockets())]) + _done("SHOW"))
        elif command == "SHOW POOLS":
            w.write(_columns(("database", "user", "cl_active", "cl_waiting", "sv_active",
                              "sv_idle", "sv_used", "maxwait", "maxwait_us", "pool_mode")))
            w.write(_row(["pgbouncer", "pgbouncer", 1, 0, 0, 0, 0, 0, 0, "statement"]))
            w.write(_done("SHOW"))
        elif command == "SHOW SOCKETS":
            await self.sockets(mode, w)
        else:
            body = b"SERROR\0C08P01\0Munknown command\0\0"
            w.write(_msg(b"E", body) + _msg(b"Z", b"I"))
        await w.drain()

    async def sockets(self, mode: str, w: asyncio.StreamWriter) -> None:
        rows = self._sockets()
        if mode == "missing":
            w.write(_columns(tuple(c for c in SOCKET_COLUMNS if c != "remote_pid")))
            w.write(_done("SHOW"))
            return
        odd = {"port": 114, "remote_pid": 3802, "wait": 1700} if mode == "wrong-types" else None
        w.write(_columns(SOCKET_COLUMNS, odd))
        if mode == "wrong-types":
            rows += [{"type": "S", "ptr": f"0xb{i}", **bad} for i, bad in enumerate(WRONG)]
        if mode == "huge":
            w.write(b"".join(_socket_row(r) for r in rows) + self.huge + _done("SHOW"))
            return
        if mode == "endless":
            i = 0
            while True:
                w.write(b"".join(_socket_row({"ptr": f"0x{i + j + 4096:x}"}) for j in range(500)))
                i += 500
                await w.drain()
        if mode in ("hang", "giant"):
            whole = _socket_row(rows[0])
            if mode == "hang":
                w.write(whole[: len(whole) // 2])
                await w.drain()
                await asyncio.sleep(3600)
                return
            w.write(b"D" + struct.pack("!ih", 2**30, 1) + struct.pack("!i", 2**30 - 10))
            chunk = b"x" * (1 << 20)
            while True:
                w.write(chunk)
                await w.drain()
        for start in range(0, len(rows), 1000):
            w.write(b"".join(_socket_row(r) for r in rows[start:start + 1000]))
            await w.drain()
        w.write(_done("SHOW"))

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:  # SSLRequest and GSSENCRequest are refused, then the startup packet
                length, code = struct.unpack("!ii", await r.readexactly(8))
                await r.readexactly(length - 8)
                if code in (80877103, 80877104):
                    w.write(b"N")
                    continue
                break
            w.write(_msg(b"R", struct.pack("!i", 0)))
            for k, v in (("server_version", "1.18.0/bouncer"), ("client_encoding", "UTF8"),
                         ("standard_conforming_strings", "on")):
                w.write(_msg(b"S", k.encode() + b"\0" + v.encode() + b"\0"))
            w.write(_msg(b"K", struct.pack("!ii", os.getpid(), 1)) + _msg(b"Z", b"I"))
            await w.drain()
            while True:
                kind = await r.readexactly(1)
                body = await r.readexactly(struct.unpack("!i", await r.readexactly(4))[0] - 4)
                if kind != b"Q":
                    break
                await self.answer(body.rstrip(b"\0").decode(), w)
        w.close()


async def _console_main(args: argparse.Namespace) -> None:
    console = FakeConsole(args)
    server = await asyncio.start_server(console.serve, args.host, args.port)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def fake_console(tmp: Path, mode: str, *, host: str = "127.0.0.7", max_client_conn: int = 200,
                 rows: int = 0) -> Iterator[tuple[int, Path, Path]]:
    """Run the fake console in its own process: (port, its query log, the --sockets file)."""
    log, sockets = tmp / f"console-{mode}.log", tmp / f"console-{mode}.json"
    log.write_text("")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--mode", mode, "--host", host, "--log", str(log),
         "--sockets", str(sockets), "--max-client-conn", str(max_client_conn),
         "--rows", str(rows)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening "), f"fake console did not start: {line!r}"
        yield int(line.split()[1]), log, sockets
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def queries_seen(log: Path, command: str) -> int:
    """How many times the console received ``command``."""
    return sum(1 for line in log.read_text().splitlines() if line.upper() == command)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A fake PgBouncer console for the tests.")
    parser.add_argument("--mode", choices=sorted(MODES), default="good")
    parser.add_argument("--host", default="127.0.0.7")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True)
    parser.add_argument("--sockets", default="")
    parser.add_argument("--max-client-conn", default="200")
    parser.add_argument("--rows", type=int, default=0)
    asyncio.run(_console_main(parser.parse_args()))
