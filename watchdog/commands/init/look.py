"""`pg-watchdog init`'s look at a server: a few snapshots, its settings and roles, as facts.

It connects as everything else does (connect.py), reads the same snapshot a sweep reads, and
the server's own timeouts on a session that sends none of them (so pg_settings shows the
server's values, not the watchdog's overrides).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from watchdog.commands.advise.look import pg_ms
from watchdog.config.policy import Config, Target
from watchdog.config.vocab import State
from watchdog.core.model import APPLICATION_NAME, Snapshot
from watchdog.core.roles import RoleFacts
from watchdog.core.rules import is_listen  # the one test of "last statement was LISTEN"
from watchdog.pg import queries
from watchdog.pg.connect import STATEMENT_TIMEOUT, TargetError, describe_error, target_session
from watchdog.pg.roles import read_roles
from watchdog.pg.snapshot import server_text, take_snapshot

# The look's session sends none of the timeouts: pg_settings shows the server's own.
_LOOK_SETTINGS = {"application_name": APPLICATION_NAME, "jit": "off"}
TIMEOUTS = ("idle_session_timeout", "idle_in_transaction_session_timeout", "transaction_timeout")
_SETTINGS = (*TIMEOUTS, "server_version")
GAP = 0.5  # seconds between two snapshots of the look
_REPLICATION = re.compile(r"walsender|walreceiver|logical replication (?!launcher)")


@dataclass(frozen=True)
class AppSeen:
    """One application_name as the look saw it: most sessions at once, and their states then."""

    name: str
    peak: int
    states: dict[str, int]
    users: tuple[str, ...]
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class Timeout:
    """A server timeout: None when this server has no such setting (transaction_timeout < 17)."""

    name: str
    ms: float | None
    source: str


@dataclass(frozen=True)
class Facts:
    """What init saw on one server."""

    server: str
    version: str
    version_num: int
    in_recovery: bool
    max_connections: int
    superuser_reserved: int
    reserved: int
    capacity: int
    peak_used: int
    role: str
    rolsuper: bool
    sees_all: bool
    can_signal: bool
    use_reserved: bool | None
    superusers: tuple[str, ...]
    roles: RoleFacts
    apps: tuple[AppSeen, ...]  # most sessions first
    listeners: dict[str, int]  # application -> sessions waiting on LISTEN
    replication: dict[str, int]  # "walsender (standby1)" and the like -> processes
    addrs: dict[str, int]  # client address -> client backends from it, at most at once
    timeouts: tuple[Timeout, ...]
    role_timeouts: tuple[tuple[str | None, str | None, str, str], ...]  # role, db, name, value
    samples: int
    seconds: float


def _peaks(snapshots: list[Snapshot]) -> tuple[tuple[AppSeen, ...], dict[str, int],
                                                dict[str, int], dict[str, int]]:
    apps: dict[str, AppSeen] = {}
    listeners: Counter[str] = Counter()
    replication: Counter[str] = Counter()
    addrs: Counter[str] = Counter()
    users: dict[str, set[str]] = {}
    where: dict[str, set[str]] = {}
    for snap in snapshots:
        mine = [s for s in snap.clients if s.pid != snap.own_pid]
        by_app: dict[str, list[Any]] = {}
        for s in mine:
            by_app.setdefault(s.application_name, []).append(s)
            users.setdefault(s.application_name, set()).add(s.usename or "?")
            if s.client_addr:
                where.setdefault(s.application_name, set()).add(s.client_addr)
        for name, sessions in by_app.items():
            if name not in apps or len(sessions) > apps[name].peak:
                states = Counter(s.state or "(not visible)" for s in sessions)
                apps[name] = AppSeen(name, len(sessions), dict(states), (), ())
        listeners |= Counter(s.application_name for s in mine
                             if s.state == State.IDLE and s.query and is_listen(s.query))
        replication |= Counter(
            f"{s.backend_type} ({s.application_name})" if s.application_name else s.backend_type
            for s in snap.sessions if _REPLICATION.match(s.backend_type))
        addrs |= Counter(s.client_addr for s in mine if s.client_addr)
    seen = tuple(
        AppSeen(a.name, a.peak, a.states, tuple(sorted(users.get(a.name, ()))),
                tuple(sorted(where.get(a.name, ()))))
        for a in sorted(apps.values(), key=lambda a: (-a.peak, a.name))
    )
    return seen, dict(listeners), dict(replication), dict(addrs)


async def _settings(conn: Any) -> tuple[tuple[Timeout, ...], str,
                                        tuple[tuple[str | None, str | None, str, str], ...]]:
    t = STATEMENT_TIMEOUT
    rows = {r["name"]: r for r in await conn.fetch(queries.ADVISE_SETTINGS, list(_SETTINGS),
                                                   timeout=t)}
    timeouts = tuple(
        Timeout(name, pg_ms(rows[name]["setting"], rows[name]["unit"] or "ms"),
                rows[name]["source"]) if name in rows else Timeout(name, None, "")
        for name in TIMEOUTS
    )
    per_role = []
    for r in await conn.fetch(queries.ADVISE_ROLE_SETTINGS, timeout=t):
        for item in r["setconfig"] or []:
            name, _, value = item.partition("=")
            if name in TIMEOUTS:
                per_role.append((server_text(r["role"]), server_text(r["database"]), name, value))
    version = rows["server_version"]["setting"] if "server_version" in rows else "?"
    return timeouts, version, tuple(per_role)


async def take_look(target: Target, seconds: float) -> Facts:
    """Look at ``target`` for ``seconds``; TargetError (one safe line) when it cannot."""
    try:
        async with target_session(target, settings=_LOOK_SETTINGS) as (conn, server):
            return await _read(conn, server, target, seconds)
    except TargetError:
        raise
    except Exception as exc:
        raise TargetError(describe_error(target, exc)) from None


async def _read(conn: Any, server: str, target: Target, seconds: float) -> Facts:
    t = STATEMENT_TIMEOUT
    # A config with no policy: its default exclude names the providers' admin roles.
    probe = Config(source="init", targets=(target,), policies=())
    roles = probe.member_roles()
    snapshots = [await take_snapshot(conn, t, roles)]
    for _ in range(max(int(seconds / GAP), 1)):
        await asyncio.sleep(GAP)
        snapshots.append(await take_snapshot(conn, t, roles))
    timeouts, version, role_timeouts = await _settings(conn)
    me = await conn.fetchrow(queries.CHECK_ROLE, timeout=t)
    supers = tuple(server_text(r["rolname"]) or "" for r in
                   await conn.fetch(queries.INIT_SUPERUSERS, timeout=t))
    facts = await read_roles(conn, probe, t)
    apps, listeners, replication, addrs = _peaks(snapshots)
    last = snapshots[-1]
    return Facts(
        server=server, version=version, version_num=last.server_version_num,
        in_recovery=last.in_recovery, max_connections=last.max_connections,
        superuser_reserved=last.superuser_reserved, reserved=last.reserved,
        capacity=last.capacity, peak_used=max(s.used for s in snapshots),
        role=me["role"], rolsuper=bool(me["rolsuper"]),
        sees_all=bool(me["rolsuper"] or me["read_all_stats"]),
        can_signal=bool(me["rolsuper"] or me["signal_backend"]), use_reserved=me["use_reserved"],
        superusers=supers, roles=facts, apps=apps, listeners=listeners, replication=replication,
        addrs=addrs, timeouts=timeouts, role_timeouts=role_timeouts,
        samples=len(snapshots), seconds=GAP * (len(snapshots) - 1),
    )

