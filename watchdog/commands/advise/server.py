"""`advise` findings from the live look alone: pooling, capacity, reserved slots.

Pure functions of one Look (the per-role timeouts are in timeouts.py).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from watchdog.commands.advise.findings import IIT, Finding
from watchdog.commands.advise.look import Look
from watchdog.config.vocab import State
from watchdog.core.model import APPLICATION_NAME, CLIENT_BACKEND, ordinary_slots
from watchdog.core.reserved import Slots, judge

MB_PER_CONNECTION = (5, 10)
MEMORY_NOTE_AT = 400  # max_connections from which the memory they imply is worth a word
SATURATED = 0.8
POOLING_MIN_CLIENTS = 4  # client addresses of one application
POOLING_MIN_SESSIONS = 12
POOLING_MAX_PER_CLIENT = 10
POOLING_IDLE_SHARE = 0.6

def pooling(look: Look) -> list[Finding]:
    """Many client addresses of one application, each with a few mostly idle sessions."""
    by_app: dict[str, list[str]] = defaultdict(list)
    states: dict[str, Counter[str]] = defaultdict(Counter)
    for s in look.sessions:
        if s.backend_type != CLIENT_BACKEND or not s.application_name:
            continue
        if s.application_name == APPLICATION_NAME:
            continue
        by_app[s.application_name].append(s.client_addr or "local")
        states[s.application_name][s.state or "?"] += 1
    found = []
    for app, addrs in by_app.items():
        per = Counter(addrs)
        total, idle = len(addrs), states[app][State.IDLE] + sum(states[app][s] for s in IIT)
        if len(per) < POOLING_MIN_CLIENTS or total < POOLING_MIN_SESSIONS:
            continue
        if max(per.values()) > POOLING_MAX_PER_CLIENT or idle / total < POOLING_IDLE_SHARE:
            continue
        peak = look.peak_active.get(app, states[app][State.ACTIVE])
        size = max(2, math.ceil(1.5 * peak))
        evidence = (
            f"'{app}': {total} sessions from {len(per)} client addresses"
            f" ({total / len(per):.1f} each, at most {max(per.values())}), {idle} of them idle"
            f" ({100 * idle / total:.0f}%); peak active {peak} over the look's samples",
            "the pods x pool_size pattern: every pod keeps its own pool open, whether it works"
            " or not",
        )
        fix = (
            "Put PgBouncer in front (pool_mode = transaction) and point the pods at it:",
            f"  default_pool_size = ceil(1.5 x peak active {peak}) = {size}"
            f"  (instead of {total} server connections now)",
            f"  max_client_conn >= {total} (the pods' pools, unchanged)",
        )
        found.append(Finding("pooling", "medium", look.target, f"application '{app}'",
                             evidence, fix))
    return found


def capacity(look: Look) -> list[Finding]:
    """The slots used at peak against the ordinary ones, and the memory max_connections implies."""
    max_conn = look.number("max_connections")
    su = look.number("superuser_reserved_connections")
    reserved = look.number("reserved_connections") if look.version_num >= 160000 else 0
    ordinary = ordinary_slots(max_conn, su, reserved)
    peak = look.peak_used
    evidence = []
    if peak / ordinary >= SATURATED:
        evidence.append(
            f"peak {peak} of {ordinary} ordinary slots used ({100 * peak / ordinary:.0f}%) over"
            f" the look's samples (max_connections {max_conn} - superuser_reserved {su}"
            + (f" - reserved {reserved}" if look.version_num >= 160000 else "") + ")"
        )
    if max_conn >= MEMORY_NOTE_AT:
        low, high = (max_conn * mb / 1024 for mb in MB_PER_CONNECTION)
        work_mem = look.number("work_mem") / 1024
        evidence.append(
            f"max_connections {max_conn} implies {low:.1f}-{high:.1f} GB at 5-10 MB per"
            f" connection, before work_mem ({work_mem:g} MB per sort or hash, several per query)"
        )
    if not evidence:
        return []
    fix = [
        "Pool before adding slots (PgBouncer, or the application's pool size x instances);"
        " if you raise max_connections, size it against memory; alert at 80% of the ordinary"
        " slots (alerts.connections_above: 80%).",
    ]
    if look.version_num < 160000:
        fix.append(
            "PostgreSQL 15 has no reserved_connections: the watchdog's held connection is what"
            " keeps it in when the server fills, so keep pg-watchdog running before it does."
        )
    return [Finding("capacity", "medium", look.target, "connection slots", tuple(evidence),
                    tuple(fix))]


def reserved_connections(look: Look) -> list[Finding]:
    """16+: slots only the watchdog (and other pg_use_reserved_connections roles) may take."""
    verdict = judge(Slots(
        version_num=look.version_num,
        reserved=look.number("reserved_connections") if look.version_num >= 160000 else 0,
        superuser_reserved=look.number("superuser_reserved_connections"),
        rolsuper=look.rolsuper,
        use_reserved=look.use_reserved,
        role=look.ident(look.role),
    ))
    if verdict.ok:
        return []
    return [Finding("reserved_connections", "medium", look.target, "reserved_connections",
                    (verdict.text,), verdict.fix)]
