"""Checking the rows of PgBouncer's console answers: every column validated and coerced.

The console is a program the watchdog does not control; its answers are data, never trusted
to have the types they declare. Everything arrives as the raw text of the simple protocol;
each field is decoded, bounded and converted here. A row that does not fit is dropped and
counted; an answer that lacks a column the watchdog needs raises AnswerError.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from watchdog.pg import queries

Raw = Sequence[bytes | None]
T = TypeVar("T")

MAX_TEXT = 4096  # bytes in any text field (PgBouncer's own packet buffer is 4 kB by default)
MAX_INT = 2**31 - 1
_PTR = re.compile(rb"0x[0-9a-f]{1,16}")
_STATE = re.compile(rb"[a-z_]{1,32}")


class AnswerError(Exception):
    """The pooler's answer does not fit: too large, or not the shape the watchdog reads."""


class BadRow(Exception):
    """One row does not fit (dropped and counted, never shown)."""


def text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    if len(raw) > MAX_TEXT:
        raise BadRow
    return _decode(raw) if len(raw) <= 256 else raw.decode("utf-8", "backslashreplace")


@functools.lru_cache(maxsize=65536)  # names and times repeat across sockets: one str each
def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def number(raw: bytes | None, high: int = MAX_INT) -> int:
    """A non-negative integer written in ASCII digits, at most ``high``."""
    if raw is None or not 0 < len(raw) <= 10 or not raw.isdigit():
        raise BadRow
    value = int(raw)
    if value > high:
        raise BadRow
    return value


def address(raw: bytes | None) -> str:
    """``unix``, or an IP address in the form PostgreSQL's host() prints."""
    if raw is None or len(raw) > 64:
        raise BadRow
    found = _address(raw)
    if found is None:
        raise BadRow
    return found


@functools.lru_cache(maxsize=65536)  # a pooler's addresses repeat across its sockets
def _address(raw: bytes) -> str | None:
    if raw == b"unix":
        return "unix"
    try:
        return ipaddress.ip_address(raw.decode("ascii")).compressed
    except (UnicodeDecodeError, ValueError):
        return None


def pointer(raw: bytes | None, empty: bool = False) -> str:
    """PgBouncer's ``0x55d1c2…`` object address; ``empty`` allows '' (no link)."""
    if empty and raw in (b"", None):
        return ""
    if raw is None or _PTR.fullmatch(raw) is None:
        raise BadRow
    return raw.decode("ascii")


class Socket(NamedTuple):
    """One row of SHOW SOCKETS: a client (``C``) or server (``S``) connection."""

    type: str
    user: str | None
    database: str | None
    state: str
    addr: str
    port: int
    local_addr: str
    local_port: int
    connect_time: str | None
    ptr: str
    link: str
    remote_pid: int
    application_name: str | None


def socket_row(v: Raw) -> Socket:
    """SOCKETS columns in order: required then optional."""
    kind, state, addr, port, laddr, lport, ptr, link, pid, user, db, ctime, app = v
    if kind not in (b"C", b"S") or state is None or _STATE.fullmatch(state) is None:
        raise BadRow
    connect_time = text(ctime)
    if connect_time is not None and len(connect_time) > 64:
        raise BadRow
    return Socket(
        kind.decode(), text(user), text(db), state.decode(), address(addr),
        number(port, 65535), address(laddr), number(lport, 65535), connect_time,
        pointer(ptr), pointer(link, empty=True), number(pid), text(app),
    )


@dataclass(frozen=True)
class PoolStats:
    """One pool (database, user) of a pooler, as SHOW POOLS counts it (logins never count)."""

    database: str
    user: str
    cl_active: int = 0
    cl_waiting: int = 0
    sv_active: int = 0
    sv_idle: int = 0
    sv_used: int = 0
    maxwait_s: float = 0.0  # how long the oldest waiting client has queued

    @property
    def empty(self) -> bool:
        """Nothing but a name: such a pool may be the trace of a client that never logged in
        (PgBouncer creates the pool of a known user's chosen database before the password)."""
        return not (self.cl_active or self.cl_waiting or self.sv_active or self.sv_idle
                    or self.sv_used or self.maxwait_s)


def pool_row(v: Raw) -> PoolStats:
    """POOLS columns in order: required then optional."""
    database, user, cl_active, cl_waiting, sv_active, sv_idle, sv_used, wait, wait_us = v
    db_name, user_name = text(database), text(user)
    if db_name is None or user_name is None or len(db_name) > 256 or len(user_name) > 256:
        raise BadRow
    micro = 0 if wait_us is None else number(wait_us, 999_999)
    return PoolStats(
        db_name, user_name, number(cl_active), number(cl_waiting), number(sv_active),
        number(sv_idle), number(sv_used), number(wait) + micro / 1e6,
    )


def setting_row(v: Raw) -> tuple[str, bytes | None]:
    """(key, raw value): SHOW CONFIG's key and value, SHOW LISTS's list and items."""
    key = text(v[0])
    if key is None or len(key) > 64:
        raise BadRow
    return key, v[1]


@dataclass(frozen=True)
class Shape(Generic[T]):
    """What one SHOW command answers: the columns it must have and how a row is read."""

    command: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    row: Callable[[Raw], T]  # the required then the optional columns, in order


SOCKETS = Shape(
    queries.PGBOUNCER_SOCKETS,
    ("type", "state", "addr", "port", "local_addr", "local_port", "ptr", "link", "remote_pid"),
    ("user", "database", "connect_time", "application_name"),
    socket_row,
)
POOLS = Shape(
    queries.PGBOUNCER_POOLS,
    ("database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "maxwait"),
    ("maxwait_us",),
    pool_row,
)
CONFIG = Shape(queries.PGBOUNCER_CONFIG, ("key", "value"), (), setting_row)
LISTS = Shape(queries.PGBOUNCER_LISTS, ("list", "items"), (), setting_row)


@dataclass
class Rows(Generic[T]):
    """The rows of one answer that fit, and how many did not."""

    shape: Shape[T]
    rows: list[T] = field(default_factory=list)
    dropped: int = 0
    picks: list[int | None] | None = None  # answer column of each shape column; None: absent
    _names: tuple[str, ...] | None = None

    def columns(self, names: Sequence[str]) -> None:
        """Check the answer's columns (once per result set): every required one, no twins."""
        if self._names is not None:
            if tuple(names) != self._names:
                raise AnswerError(f"answer to {self.shape.command} changes its columns")
            return
        index = {n: i for i, n in enumerate(names)}
        if len(index) != len(names):
            raise AnswerError(f"answer to {self.shape.command} repeats a column")
        missing = [c for c in self.shape.required if c not in index]
        if missing:
            raise AnswerError(f"answer to {self.shape.command} lacks {', '.join(missing)}")
        self._names = tuple(names)
        self.picks = [index.get(c) for c in (*self.shape.required, *self.shape.optional)]

    def feed(self, raws: Sequence[Raw]) -> None:
        """Read ``raws``: rows already cut to :attr:`picks`, in the shape's column order."""
        read = self.shape.row
        for raw in raws:
            try:
                self.rows.append(read(raw))
            except BadRow:
                self.dropped += 1


def max_client_conn(rows: Rows[tuple[str, bytes | None]]) -> int | None:
    """max_client_conn from SHOW CONFIG; AnswerError when it is there but not a sane number."""
    for key, value in rows.rows:
        if key == "max_client_conn":
            try:
                return number(value, 10_000_000) or None
            except BadRow:
                raise AnswerError("SHOW CONFIG: max_client_conn is not a number") from None
    return None


def used_clients(rows: Rows[tuple[str, bytes | None]]) -> int:
    """Client connections PgBouncer holds (logins and consoles included), from SHOW LISTS."""
    for key, value in rows.rows:
        if key == "used_clients":
            try:
                return number(value)
            except BadRow:
                break
    raise AnswerError("SHOW LISTS: no used_clients count")
