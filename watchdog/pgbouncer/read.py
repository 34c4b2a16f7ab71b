"""One SHOW command on PgBouncer's console, its answer bounded in rows and bytes.

psycopg's ``Cursor.stream()`` sends the extended protocol, which the console refuses
("extended query protocol not supported by admin console"), and ``fetchall()`` holds a whole
answer, however large, before anything can look at it. So this drives libpq through
psycopg's own low-level interface (``psycopg.pq``): a simple query in chunked-rows mode
(single-row mode before libpq 17), its rows counted as they come and its bytes passed by the
connection's relay (watchdog.pgbouncer.relay) up to the cap only; past either cap the answer is
given up. Rows are checked (watchdog.pgbouncer.rows) in a worker thread, a batch at a time, so a
huge answer never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, TypeVar

from watchdog.pgbouncer.relay import Relay
from watchdog.pgbouncer.rows import AnswerError, Raw, Rows, Shape

T = TypeVar("T")

CHUNK = 1000  # rows per batch handed to the worker thread
# Rows of one SHOW SOCKETS: every client (at most max_client_conn) and every server connection
# (at most the pools' sizes, in practice fewer than the clients): 4 x max_client_conn leaves
# room for both. The floor covers small poolers; the ceiling a console claiming any limit.
ROWS_PER_CLIENT = 4
MIN_ROWS = 1_000
MAX_ROWS = 200_000
# A SHOW SOCKETS row is 250-350 bytes on the wire (PgBouncer 1.18, 25 columns); a client
# may choose an application_name up to PgBouncer's 4 kB packet buffer. 1 kB a row on average,
# and never more than 64 MB in all (100,000 real sockets take about 30 MB).
BYTES_PER_ROW = 1024
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class Caps:
    """The most one answer may hold before the watchdog gives up on it."""

    rows: int
    bytes: int

    @classmethod
    def for_clients(cls, max_client_conn: int | None) -> Caps:
        """Caps for a pooler of ``max_client_conn`` clients (None: unknown)."""
        rows = ROWS_PER_CLIENT * (max_client_conn or MAX_ROWS)
        rows = min(max(rows, MIN_ROWS), MAX_ROWS)
        return cls(rows, min(rows * BYTES_PER_ROW, MAX_BYTES))


SMALL = Caps(MIN_ROWS, MIN_ROWS * BYTES_PER_ROW)  # SHOW CONFIG, SHOW LISTS


class ConsoleError(Exception):
    """The console answered the command with an error (e.g. the role may not run it)."""


def printable(text: str, width: int = 200) -> str:
    """The console's own words, as one safe line of a log or an alert."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:width])


class Console:
    """A connection to a pooler's admin console: psycopg's, its bytes metered by a Relay."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.relay = Relay(conn.pgconn.socket)

    @property
    def closed(self) -> bool:
        return bool(self.conn.closed) or not self.relay.alive

    async def close(self) -> None:
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.close(), 1)
        finally:
            await self.relay.close()


async def _ready(fd: int, write: bool = False) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await done
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


def _cut(rows: Rows[Any], batch: list[Any]) -> None:
    """Worker thread: each result's rows, cut to the columns ``rows`` reads, then checked."""
    picks = rows.picks or []
    present = [c for c in picks if c is not None]
    for res in batch:
        get = res.get_value
        if len(present) == len(picks):  # every column there: the common case, kept tight
            raws: list[Raw] = [tuple([get(r, c) for c in present]) for r in range(res.ntuples)]
        else:
            raws = [tuple([None if c is None else get(r, c) for c in picks])
                    for r in range(res.ntuples)]
        res.clear()  # libpq's copy goes as soon as it is read
        rows.feed(raws)


async def show(console: Console, shape: Shape[T], caps: Caps) -> Rows[T]:
    """Run ``shape.command`` on the console and check its answer.

    AnswerError when the answer passes ``caps`` or lacks a column; ConsoleError when the
    console refuses the command. Anything but a complete answer leaves the console closed:
    an answer abandoned midway cannot be resynchronised.
    """
    from psycopg import capabilities
    from psycopg.pq import ExecStatus, Format

    pgconn = console.conn.pgconn
    rows: Rows[T] = Rows(shape)
    complete = False
    console.relay.allow(caps.bytes)
    try:
        pgconn.send_query(shape.command.encode())
        if capabilities.has_stream_chunked():
            pgconn.set_chunked_rows_mode(CHUNK)
        else:
            pgconn.set_single_row_mode()
        while pgconn.flush():
            await _ready(pgconn.socket, write=True)
        count = 0
        batch: list[Any] = []
        while True:
            while pgconn.is_busy():
                await _ready(pgconn.socket)
                try:
                    pgconn.consume_input()
                except Exception:
                    if console.relay.exhausted:
                        raise AnswerError(
                            f"answer to {shape.command} passes {caps.bytes} bytes") from None
                    raise
            res = pgconn.get_result()
            if res is None:
                break
            if res.status == ExecStatus.FATAL_ERROR:
                if console.relay.exhausted:
                    raise AnswerError(f"answer to {shape.command} passes {caps.bytes} bytes")
                message = (res.error_message or b"").decode("utf-8", "replace").strip()
                raise ConsoleError(printable(message.splitlines()[0]) if message else
                                   f"{shape.command} failed")
            if res.status not in (ExecStatus.SINGLE_TUPLE, ExecStatus.TUPLES_CHUNK,
                                  ExecStatus.TUPLES_OK):
                status = ExecStatus(res.status).name
                raise AnswerError(f"answer to {shape.command} has no rows ({status})")
            names = [(res.fname(i) or b"").decode("utf-8", "replace") for i in range(res.nfields)]
            rows.columns(names)
            if any(res.fformat(i) != Format.TEXT for i in range(res.nfields)):
                raise AnswerError(f"answer to {shape.command} is not text")
            count += res.ntuples
            if count > caps.rows:
                raise AnswerError(f"answer to {shape.command} passes {caps.rows} rows")
            if res.ntuples:
                batch.append(res)
            if sum(r.ntuples for r in batch) >= CHUNK or (batch and not res.ntuples):
                await asyncio.to_thread(_cut, rows, batch)
                batch = []
        if batch:
            await asyncio.to_thread(_cut, rows, batch)
        if rows.picks is None:
            raise AnswerError(f"answer to {shape.command} has no rows")
        complete = True
        return rows
    finally:
        console.relay.allow(0)
        if not complete:
            pgconn.finish()
