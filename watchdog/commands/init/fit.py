"""What `pg-watchdog init` fits from what it saw: tools to spare, thresholds that do not fight
the server's own timeouts, the escalation percentage, the alert level, a pooler. Pure.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import quote

from watchdog.commands.init.look import AppSeen, Facts, Timeout
from watchdog.config.units import format_duration

# Tools a person runs, as (the glob written into exclude.applications, what it is). A session
# a DBA opened is theirs to close; a dump or a backup killed midway is worse than an idle slot.
TOOLS = (
    ("psql", "psql"),
    ("pg_dump*", "pg_dump / pg_dumpall"),
    ("pg_restore", "pg_restore"),
    ("pg_basebackup", "pg_basebackup"),
    ("pgAdmin*", "pgAdmin"),
    ("DBeaver*", "DBeaver"),
    ("DataGrip*", "DataGrip"),
    ("IntelliJ IDEA*", "IntelliJ IDEA (database tools)"),
    ("PyCharm*", "PyCharm (database tools)"),
    ("GoLand*", "GoLand (database tools)"),
    ("TablePlus*", "TablePlus"),
    ("Postico*", "Postico"),
    ("Navicat*", "Navicat"),
    ("HeidiSQL*", "HeidiSQL"),
    ("Beekeeper*", "Beekeeper Studio"),
    ("azuredatastudio*", "Azure Data Studio"),
    ("pgcli*", "pgcli"),
    ("SQL Workbench*", "SQL Workbench/J"),
    ("dbForge*", "dbForge Studio"),
    ("vacuumdb", "vacuumdb"),
    ("reindexdb", "reindexdb"),
    ("pg_repack", "pg_repack"),
)
# Always proposed, seen or not: the shipped defaults.
ALWAYS = ("pg_dump*", "pg_basebackup", "psql")
POOLER_NAMES = ("pgbouncer", "odyssey", "pgcat", "pgpool")
POOLER_MIN_BACKENDS = 10  # client backends at once from one address
POOLER_PORT = 6432  # PgBouncer's default
DEFAULT_IDLE, DEFAULT_IIT = 600.0, 300.0
BEFORE_SERVER = 0.8  # act at 80 % of a server timeout, so the watchdog is first
ESCALATION_HEADROOM = 0.10  # escalate when this share of the ordinary slots (at least 3) is left
ALERT_DEFAULT, ALERT_MARGIN, ALERT_MAX = 80, 5, 95


@dataclass(frozen=True)
class ToolSeen:
    glob: str
    label: str
    apps: tuple[AppSeen, ...]  # empty: proposed though not connected now


@dataclass(frozen=True)
class Threshold:
    seconds: float
    notes: tuple[str, ...]


def glob_exact(name: str) -> str:
    """A shell glob matching exactly ``name`` (fnmatch has no escape: brackets do it)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def tools(facts: Facts) -> tuple[tuple[ToolSeen, ...], tuple[AppSeen, ...]]:
    """The tools to propose for exclude.applications, and the applications left to judge."""
    found: dict[str, list[AppSeen]] = {glob: [] for glob, _ in TOOLS}
    extra: list[ToolSeen] = []
    judged: list[AppSeen] = []
    for app in facts.apps:
        low = app.name.lower()
        glob = next((g for g, _ in TOOLS if fnmatchcase(low, g.lower())), None)
        if glob is None:
            judged.append(app)
        elif fnmatchcase(app.name, glob):
            found[glob].append(app)
        else:  # the tool's name in another case: the glob is case-sensitive, so exactly this
            label = dict(TOOLS)[glob]
            extra.append(ToolSeen(glob_exact(app.name), label, (app,)))
    seen = [ToolSeen(g, label, tuple(found[g])) for g, label in TOOLS
            if found[g] or g in ALWAYS]
    return (*seen, *extra), tuple(judged)


def _fit(default: float, flag: float | None, what: str, limits: list[Timeout]) -> Threshold:
    value = default if flag is None else flag
    set_ = [t for t in limits if t.ms]
    if not set_:
        return Threshold(value, ())
    tight = min(set_, key=lambda t: t.ms or 0.0)
    limit = (tight.ms or 0.0) / 1000
    shown = f"{tight.name} = {format_duration(limit)} ({tight.source})"
    if limit > value:
        return Threshold(value, (f"the server's {shown} is longer: the watchdog acts first, with"
                                 " its exclusions and a record; the server's timeout stays the"
                                 " backstop",))
    if flag is not None:
        return Threshold(value, (f"the server's {shown} ends {what} sessions before this"
                                 " threshold: this policy will see none of them",))
    value = max(math.floor(BEFORE_SERVER * limit), 1)
    return Threshold(float(value), (
        f"the server's {shown} ends {what} sessions itself, without exclusions or a record:"
        f" the watchdog acts at {format_duration(value)}, before it, so its exclusions and audit"
        " record apply; the sessions it spares are still ended by the server",))


def thresholds(facts: Facts, idle: float | None, iit: float | None
               ) -> tuple[Threshold, Threshold]:
    """The idle and idle-in-transaction thresholds, kept clear of the server's own timeouts."""
    t = {x.name: x for x in facts.timeouts}
    return (
        _fit(DEFAULT_IDLE, idle, "idle", [t["idle_session_timeout"]]),
        _fit(DEFAULT_IIT, iit, "idle-in-transaction",
             [t["idle_in_transaction_session_timeout"], t["transaction_timeout"]]),
    )


def escalation_percent(capacity: int) -> int:
    """connections_above for the escalation policy: when about a tenth of the slots is left."""
    headroom = max(3, math.ceil(ESCALATION_HEADROOM * capacity))
    return min(max(math.floor(100 * (capacity - headroom) / max(capacity, 1)), 50), 99)


def alert_percent(facts: Facts) -> int:
    """alerts.connections_above: the default, unless the server already sits near it."""
    now = math.ceil(100 * facts.peak_used / max(facts.capacity, 1))
    return max(ALERT_DEFAULT, min(now + ALERT_MARGIN, ALERT_MAX))


def poolers(facts: Facts) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """Applications named like a pooler, and addresses holding many backends at once."""
    named = tuple(a.name for a in facts.apps if a.name.lower().startswith(POOLER_NAMES))
    busy = []
    for addr, n in sorted(facts.addrs.items(), key=lambda kv: (-kv[1], kv[0])):
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            continue
        if n >= POOLER_MIN_BACKENDS and not ip.is_loopback:
            busy.append((str(ip), n))
    return named, tuple(busy)


def pooler_dsn(addr: str, role: str) -> str:
    """A PgBouncer admin-console DSN on ``addr`` for the commented poolers block."""
    host = f"[{addr}]" if ":" in addr else addr  # an address, or the placeholder PGBOUNCER_HOST
    return f"postgresql://{quote(role, safe='')}@{host}:{POOLER_PORT}/pgbouncer"
