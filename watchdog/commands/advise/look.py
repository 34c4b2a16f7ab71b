"""`advise`'s live look at one target: sessions, settings, counters, prepared transactions."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from watchdog.config.policy import Target
from watchdog.config.vocab import State
from watchdog.core.model import APPLICATION_NAME, CLIENT_BACKEND
from watchdog.pg import queries
from watchdog.pg.connect import STATEMENT_TIMEOUT, TargetError, describe_error, target_session
from watchdog.pg.prepared import PreparedXact, read_prepared
from watchdog.pg.snapshot import server_text, take_snapshot
from watchdog.text.quoting import quote_ident

# The settings the advice reads (server-wide values; per role and database come separately).
SETTINGS = (
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "idle_in_transaction_session_timeout",
    "statement_timeout",
    "idle_session_timeout",
    "transaction_timeout",  # 17+; absent before
    "work_mem",
    "shared_buffers",
    "server_version_num",
)
TIMEOUTS = (
    "idle_in_transaction_session_timeout",
    "statement_timeout",
    "idle_session_timeout",
    "transaction_timeout",
)
# The look's own session sends none of TIMEOUTS, so pg_settings shows the server's values.
_LOOK_SETTINGS = {"application_name": APPLICATION_NAME, "jit": "off"}
SAMPLES, SAMPLE_GAP = 5, 0.2  # sessions are read a few times, for their peak
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60000.0, "h": 3600000.0, "d": 86400000.0}


@dataclass(frozen=True)
class LiveSession:
    usename: str | None
    application_name: str
    client_addr: str | None
    state: str | None
    backend_type: str


@dataclass(frozen=True)
class DbStats:
    datname: str
    sessions: int
    sessions_killed: int
    sessions_abandoned: int
    idle_in_transaction_ms: float


@dataclass(frozen=True)
class Look:
    """What one target showed: settings in their pg_settings form (base unit, as text)."""

    target: str
    settings: dict[str, str]
    units: dict[str, str]
    # (role or None for all, database or None for all) -> {setting: value as written}
    role_settings: dict[tuple[str | None, str | None], dict[str, str]]
    sessions: tuple[LiveSession, ...]  # the last sample
    db_stats: tuple[DbStats, ...]
    keywords: frozenset[str]  # those quote_ident() quotes on this server (pg_get_keywords)
    peak_used: int = 0  # Snapshot.used (the look's own session too), at the busiest sample
    peak_active: dict[str, int] = field(default_factory=dict)  # application -> most active
    role: str = ""
    rolsuper: bool = False
    use_reserved: bool | None = None
    notes: tuple[str, ...] = field(default=())
    prepared: tuple[PreparedXact, ...] = ()

    def ident(self, name: str) -> str:
        """``name`` quoted for printed SQL as this server's quote_ident() would."""
        return quote_ident(name, self.keywords)

    @property
    def version_num(self) -> int:
        return int(self.settings.get("server_version_num", "0"))

    def number(self, name: str) -> int:
        return int(self.settings.get(name, "0") or 0)

    def timeout_ms(self, name: str, role: str | None, database: str | None) -> float | None:
        """The value ``name`` takes for a new session of ``role`` in ``database`` (ms).

        PostgreSQL's order: role in database, then role, then database, then the server.
        """
        for key in ((role, database), (role, None), (None, database)):
            value = self.role_settings.get(key, {}).get(name)
            if value is not None:
                return pg_ms(value)
        if name not in self.settings:
            return None
        return pg_ms(self.settings[name], self.units.get(name) or "ms")


def pg_ms(text: str, unit: str = "ms") -> float | None:
    """A PostgreSQL time setting (``5min``, ``30s``, ``500``) in ms; None if unreadable."""
    s = text.strip().strip("'").strip()
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    suffix = s[len(number) :].strip() or unit
    try:
        return float(number) * _UNIT_MS[suffix]
    except (ValueError, KeyError):
        return None


def _setconfig(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if sep:
            out[name] = value
    return out


async def take_look(target: Target) -> Look:
    """One look at ``target``; TargetError (one safe line) when it cannot be reached or read."""
    try:
        async with target_session(target, settings=_LOOK_SETTINGS) as (conn, _):
            return await _read(conn, target)
    except TargetError:
        raise
    except Exception as exc:
        raise TargetError(describe_error(target, exc)) from None


async def _read(conn: Any, target: Target) -> Look:
    t = STATEMENT_TIMEOUT
    rows = await conn.fetch(queries.ADVISE_SETTINGS, list(SETTINGS), timeout=t)
    settings = {r["name"]: r["setting"] for r in rows}
    units = {r["name"]: r["unit"] or "" for r in rows}
    notes = [
        f"{r['name']} of the server is hidden by the watchdog role's own setting ({r['source']})"
        for r in rows
        if r["name"] in TIMEOUTS and r["source"] in ("user", "database", "database user")
    ]
    per: dict[tuple[str | None, str | None], dict[str, str]] = {}
    for r in await conn.fetch(queries.ADVISE_ROLE_SETTINGS, timeout=t):
        key = (server_text(r["role"]), server_text(r["database"]))
        per[key] = _setconfig(r["setconfig"])
    sessions: tuple[LiveSession, ...] = ()
    peak_used = 0
    peak_active: Counter[str] = Counter()
    for i in range(SAMPLES):
        if i:
            await asyncio.sleep(SAMPLE_GAP)
        snap = await take_snapshot(conn, t)
        sessions = tuple(
            LiveSession(s.usename, s.application_name, s.client_addr, s.state, s.backend_type)
            for s in snap.sessions if s.pid != snap.own_pid
        )
        clients = [s for s in sessions if s.backend_type == CLIENT_BACKEND]
        peak_used = max(peak_used, snap.used)
        active = Counter(s.application_name for s in clients if s.state == State.ACTIVE)
        peak_active = peak_active | active
    stats = tuple(
        DbStats(
            server_text(r["datname"]) or "",
            r["sessions"] or 0,
            r["sessions_killed"] or 0,
            r["sessions_abandoned"] or 0,
            float(r["idle_in_transaction_time"] or 0.0),
        )
        for r in await conn.fetch(queries.ADVISE_DB_STATS, timeout=t)
    )
    me = await conn.fetchrow(queries.CHECK_ROLE, timeout=t)
    keywords = frozenset(await conn.fetchval(queries.KEYWORDS, timeout=t))
    return Look(
        target=target.name,
        settings=settings,
        units=units,
        role_settings=per,
        sessions=sessions,
        db_stats=stats,
        keywords=keywords,
        peak_used=peak_used,
        peak_active=dict(peak_active),
        role=me["role"],
        rolsuper=bool(me["rolsuper"]),
        use_reserved=me["use_reserved"],
        notes=tuple(notes),
        prepared=await read_prepared(conn, t),
    )
