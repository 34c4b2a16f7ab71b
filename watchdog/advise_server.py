"""`advise` findings that need the server's side: timeouts per role, pooling, capacity, slots.

Pure functions of the audit records and one live look (advise_look.Look).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from watchdog.advise import (
    IIT,
    MIN_KILLS,
    MIN_SHARE,
    Finding,
    Record,
    Window,
    age_text,
    ages,
    group,
    kills_of,
    nice_value,
    rate_text,
    through_pooler,
)
from watchdog.advise_look import Look
from watchdog.checks import quote_ident
from watchdog.config import Policy
from watchdog.model import APPLICATION_NAME, CLIENT_BACKEND
from watchdog.units import format_duration

RESERVED_SUGGESTED = 3
MB_PER_CONNECTION = (5, 10)
MEMORY_NOTE_AT = 400  # max_connections from which the memory they imply is worth a word
SATURATED = 0.8
POOLER_APPS = ("pgbouncer", "odyssey", "pgcat", "pgpool")
POOLING_MIN_CLIENTS = 4  # client addresses of one application
POOLING_MIN_SESSIONS = 12
POOLING_MAX_PER_CLIENT = 10
POOLING_IDLE_SHARE = 0.6
WATCHDOG_KEEPS = (
    "pg-watchdog still does what the setting cannot: its exclusions (superusers, pg_dump,"
    " listeners, ...), an audit record of every session it ends, escalation (when:"
    " connections_above) and dry runs; keep its policy as the backstop."
)
IDLE_SESSION_WARNING = (
    "The PostgreSQL documentation warns: set idle_session_timeout only where no"
    " connection-pooling software (or a postgres_fdw connection from another server) holds"
    " the sessions, since such a layer may not react well to its connections closing under it."
)



def _iit(r: Record) -> bool:
    return r.get("state") in IIT


def _cancelled(r: Record) -> bool:
    return r.get("action") == "cancel"


def _idle(r: Record) -> bool:
    return r.get("state") == "idle"


# (finding id, setting, which kills, the kind of session in words)
TIMEOUTS = (
    ("idle_in_transaction_timeout", "idle_in_transaction_session_timeout", _iit,
     "idle in transaction"),
    ("statement_timeout", "statement_timeout", _cancelled, "running a query (action: cancel)"),
    ("idle_session_timeout", "idle_session_timeout", _idle, "idle"),
)


def timeouts(
    look: Look, records: Sequence[Record], policies: Mapping[str, Policy], window: Window
) -> list[Finding]:
    """Roles killed again and again for what a server timeout would end, with it at 0."""
    found = []
    kills = kills_of(records)
    for fid, setting, which, words in TIMEOUTS:
        matching = [r for r in kills if which(r)]
        if fid == "idle_session_timeout" and look.version_num < 140000:
            continue
        for (role,), mine in group(matching, "usename").items():
            if not isinstance(role, str) or len(mine) < MIN_KILLS:
                continue
            if len(mine) / len(matching) < MIN_SHARE:
                continue  # judged by count and share, never by how long the window is
            if fid == "idle_session_timeout" and _pooled(look, role, records):
                continue
            dbs = sorted({str(r.get("datname")) for r in mine if r.get("datname")})
            unset = [d for d in dbs if look.timeout_ms(setting, role, d) == 0]
            if not unset:
                continue
            found.append(_timeout_finding(look, fid, setting, words, role, mine, unset,
                                          policies, window, len(matching)))
    return found


def _pooled(look: Look, role: str, records: Sequence[Record]) -> bool:
    if through_pooler(r for r in records if r.get("usename") == role):
        return True
    return any(
        s.usename == role and s.application_name.lower().startswith(POOLER_APPS)
        for s in look.sessions
    )


def _timeout_finding(
    look: Look, fid: str, setting: str, words: str, role: str, mine: list[Record],
    unset: list[str], policies: Mapping[str, Policy], window: Window, of: int,
) -> Finding:
    limits = [policies[n].longer_than for n in {str(r.get("policy")) for r in mine}
              if n in policies]
    observed = ages(mine)
    # The watchdog's threshold already says "past this it is a leak"; a policy changed since
    # may have acted earlier, and the server must never end what the watchdog spared.
    base = min(limits) if limits else min(observed, default=60.0)
    if observed and min(observed) < base:
        base = min(observed)
    value = nice_value(base)
    where = ", ".join(unset)
    evidence = [
        f"role {role}: {rate_text(mine, window)} while {words} ({len(mine)} of {of} such kills"
        f" on {look.target}); {age_text(mine)}",
        f"{setting} is 0 for role {role} in database {where} (server, database and role"
        " settings read live)",
    ]
    if fid == "idle_in_transaction_timeout":
        for st in look.db_stats:
            if st.datname in unset and st.sessions:
                idle = st.idle_in_transaction_ms / 1000
                evidence.append(
                    f"pg_stat_database {st.datname} since its stats reset: {st.sessions} sessions,"
                    f" {st.sessions_killed} killed, {st.sessions_abandoned} abandoned"
                    + (f", {format_duration(idle)} idle in transaction in all" if idle else "")
                )
    q = quote_ident(role)
    fix = [
        f"ALTER ROLE {q} SET {setting} = '{value}';",
        f"(from the policy threshold and the ages at kill; new sessions of {role} get it)",
    ]
    if len(unset) == 1:
        fix.append(
            f"or only in that database: ALTER ROLE {q} IN DATABASE {quote_ident(unset[0])}"
            f" SET {setting} = '{value}';"
        )
    fix.append(IDLE_SESSION_WARNING if fid == "idle_session_timeout" else WATCHDOG_KEEPS)
    return Finding(fid, "high" if fid != "idle_session_timeout" else "medium", look.target,
                   f"role {role}", tuple(evidence), tuple(fix))


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
        total, idle = len(addrs), states[app]["idle"] + sum(states[app][s] for s in IIT)
        if len(per) < POOLING_MIN_CLIENTS or total < POOLING_MIN_SESSIONS:
            continue
        if max(per.values()) > POOLING_MAX_PER_CLIENT or idle / total < POOLING_IDLE_SHARE:
            continue
        peak = look.peak_active.get(app, states[app]["active"])
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
    ordinary = max(max_conn - su - reserved, 1)
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
    if look.version_num < 160000:
        return []
    reserved = look.number("reserved_connections")
    grant = f"GRANT pg_use_reserved_connections TO {quote_ident(look.role)};"
    if reserved == 0:
        evidence = (
            "reserved_connections = 0: when the ordinary slots are full, a watchdog that is not"
            " already connected cannot get in (only superusers can)",
        )
        fix = [f"ALTER SYSTEM SET reserved_connections = {RESERVED_SUGGESTED};  -- then restart"]
        if not look.rolsuper:
            fix.append(grant)
    elif not look.rolsuper and not look.use_reserved:
        evidence = (
            f"reserved_connections = {reserved}, but role {look.role} may not use them",
        )
        fix = [grant]
    else:
        return []
    return [Finding("reserved_connections", "medium", look.target, "reserved_connections",
                    evidence, tuple(fix))]
