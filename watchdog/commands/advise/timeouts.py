"""`advise` findings for the server's own timeouts, per role: the idle ones, statement_timeout,
and transaction_timeout (17+; a policy on 15 and 16).

A timeout is advised only where the kills show it would have acted: each runs on its own
clock (idle time since state_change, query time since query_start, transaction time since
xact_start), and a kill counts for it only when that clock had reached the watchdog's
threshold when the session was ended. Pure functions of the audit records and one Look.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

from watchdog.audit.render import record_time
from watchdog.commands.advise.findings import (
    IIT,
    MIN_KILLS,
    MIN_SHARE,
    Finding,
    Record,
    Window,
    ages,
    counted_once,
    group,
    kills_of,
    nice_value,
    rate_text,
    through_pooler,
)
from watchdog.commands.advise.look import Look
from watchdog.config.policy import Policy
from watchdog.config.units import format_duration
from watchdog.config.vocab import Signal, State

POOLER_APPS = ("pgbouncer", "odyssey", "pgcat", "pgpool")
# A kill's clock counts as having reached the threshold within this share of it (the look
# that acted and the clocks' millisecond precision differ by a little).
TOLERANCE = 0.1
# A long transaction: it had already run this long before its current state began, and at
# least as long as it has been in that state ("xact_start far older than state_change").
LONG_XACT_BEFORE_S = 1.0
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
TRANSACTION_TIMEOUT_CAVEATS = (
    "transaction_timeout ends the whole session, and caps a single long statement too: set it"
    " for this role only, never server-wide (pg_dump, migrations and reports run long"
    " transactions).",
    "Prepared transactions (PREPARE TRANSACTION) are exempt from it, as from every timeout:"
    " pg-watchdog reports stale ones (finding stale_prepared).",
    "A session may still lower or turn it off (SET transaction_timeout = 0).",
)


def _iit(r: Record) -> bool:
    return r.get("state") in IIT


def _cancelled(r: Record) -> bool:
    return r.get("action") == Signal.CANCEL


def _idle(r: Record) -> bool:
    return r.get("state") == State.IDLE


# (finding id, setting, which kills, the kind of session in words, the clock it runs on)
TIMEOUTS: tuple[tuple[str, str, Callable[[Record], bool], str, str], ...] = (
    ("idle_in_transaction_timeout", "idle_in_transaction_session_timeout", _iit,
     State.IDLE_IN_TRANSACTION, "state_change"),
    ("statement_timeout", "statement_timeout", _cancelled, "running a query (action: cancel)",
     "query_start"),
    ("idle_session_timeout", "idle_session_timeout", _idle, State.IDLE, "state_change"),
)


# -- clocks ---------------------------------------------------------------------------


def acted_at(r: Record, policies: Mapping[str, Policy]) -> datetime | None:
    """The server's time at the look that ended ``r``'s session: the policy's clock plus the
    age it measured (server timestamps only), else the record's own time."""
    p = policies.get(str(r.get("policy")))
    age = r.get("age_s")
    if p is not None and isinstance(age, int | float):
        origin = record_time(r.get(p.measured_from))
        if origin is not None:
            return origin + timedelta(seconds=float(age))
    return record_time(r.get("ts"))


def clock(r: Record, field: str, policies: Mapping[str, Policy]) -> float | None:
    """Seconds from ``r[field]`` to the moment the watchdog acted on the session."""
    start, end = record_time(r.get(field)), acted_at(r, policies)
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)


def threshold(r: Record, policies: Mapping[str, Policy]) -> float | None:
    p = policies.get(str(r.get("policy")))
    if p is not None:
        return p.longer_than
    age = r.get("age_s")
    return float(age) if isinstance(age, int | float) else None


def reached(r: Record, field: str, policies: Mapping[str, Policy]) -> bool:
    """Whether a server timeout on ``field``'s clock, at the watchdog's threshold, would have
    ended this session before the watchdog did."""
    limit, ran = threshold(r, policies), clock(r, field, policies)
    return limit is not None and ran is not None and ran >= limit * (1 - TOLERANCE)


def long_transaction(r: Record, policies: Mapping[str, Policy]) -> bool:
    """xact_start far older than state_change: a transaction, not one idle spell, is long."""
    begun, changed = record_time(r.get("xact_start")), record_time(r.get("state_change"))
    in_state = clock(r, "state_change", policies)
    if begun is None or changed is None or in_state is None:
        return False
    before = (changed - begun).total_seconds()
    return before >= max(in_state, LONG_XACT_BEFORE_S)


def _ages(records: Sequence[Record], field: str, policies: Mapping[str, Policy]) -> list[float]:
    return [a for r in records if (a := clock(r, field, policies)) is not None]


def _age_text(values: list[float], what: str) -> str:
    if not values:
        return f"{what} unknown"
    values = sorted(values)
    typical = values[len(values) // 2]
    return f"{what}: typical {format_duration(typical)}, longest {format_duration(values[-1])}"


# -- idle_in_transaction_session_timeout, statement_timeout, idle_session_timeout -----------


def timeouts(
    look: Look, records: Sequence[Record], policies: Mapping[str, Policy], window: Window
) -> list[Finding]:
    """Roles killed again and again for what a server timeout would end, with it at 0."""
    found = []
    kills = kills_of(records)
    for fid, setting, which, words, field in TIMEOUTS:
        if setting not in look.settings:
            continue
        matching = [r for r in kills if which(r) and reached(r, field, policies)]
        for (role,), mine in group(matching, "usename").items():
            if not isinstance(role, str) or len(mine) < MIN_KILLS:
                continue
            if len(mine) / len(matching) < MIN_SHARE:
                continue  # judged by count and share, never by how long the window is
            if fid == "idle_session_timeout" and _pooled(look, role, records):
                continue
            unset = _unset(look, setting, role, mine)
            if not unset:
                continue
            ran = _ages(mine, field, policies)
            # The watchdog's threshold already says "past this it is a leak"; a policy changed
            # since may have acted earlier, and the server must never end what it spared.
            limits = [t for r in mine if (t := threshold(r, policies)) is not None]
            value = nice_value(min(limits + ages(mine)))
            evidence = [
                f"role {role}: {rate_text(mine, window)} while {words} ({len(mine)} of"
                f" {len(matching)} such kills on {look.target});"
                f" {_age_text(ran, f'{_clock_words(field)} at kill')}",
                f"{setting} is 0 for role {role} in database {', '.join(unset)} (server,"
                " database and role settings read live)",
                *counted_once(records, mine),
            ]
            if fid == "idle_in_transaction_timeout":
                evidence += _db_stats(look, unset)
            fix = _alter_role(look, setting, role, unset, value)
            fix.append(IDLE_SESSION_WARNING if fid == "idle_session_timeout" else WATCHDOG_KEEPS)
            severity = "medium" if fid == "idle_session_timeout" else "high"
            found.append(Finding(fid, severity, look.target, f"role {role}", tuple(evidence),
                                 tuple(fix)))
    return found


def _clock_words(field: str) -> str:
    return {"state_change": "time in that state", "query_start": "query time",
            "xact_start": "transaction age"}[field]


def _unset(look: Look, setting: str, role: str, mine: Sequence[Record]) -> list[str]:
    dbs = sorted({str(r.get("datname")) for r in mine if r.get("datname")})
    return [d for d in dbs if look.timeout_ms(setting, role, d) == 0]


def _pooled(look: Look, role: str, records: Sequence[Record]) -> bool:
    if through_pooler(r for r in records if r.get("usename") == role):
        return True
    return any(
        s.usename == role and s.application_name.lower().startswith(POOLER_APPS)
        for s in look.sessions
    )


def _db_stats(look: Look, unset: list[str]) -> list[str]:
    out = []
    for st in look.db_stats:
        if st.datname in unset and st.sessions:
            idle = st.idle_in_transaction_ms / 1000
            out.append(
                f"pg_stat_database {st.datname} since its stats reset: {st.sessions} sessions,"
                f" {st.sessions_killed} killed, {st.sessions_abandoned} abandoned"
                + (f", {format_duration(idle)} idle in transaction in all" if idle else "")
            )
    return out


def _alter_role(look: Look, setting: str, role: str, unset: list[str], value: str) -> list[str]:
    q = look.ident(role)
    fix = [
        f"ALTER ROLE {q} SET {setting} = '{value}';",
        f"(from the policy threshold and the ages at kill; new sessions of {role} get it)",
    ]
    if len(unset) == 1:
        fix.append(
            f"or only in that database: ALTER ROLE {q} IN DATABASE {look.ident(unset[0])}"
            f" SET {setting} = '{value}';"
        )
    return fix


# -- transaction_timeout ------------------------------------------------------------


def transaction_timeout(
    look: Look, records: Sequence[Record], policies: Mapping[str, Policy], window: Window
) -> list[Finding]:
    """Roles whose transactions, not their idle spells, were too long: transaction_timeout on
    17+, a policy measured from xact_start before."""
    found = []
    long = [r for r in kills_of(records) if long_transaction(r, policies)]
    for (role,), mine in group(long, "usename").items():
        if not isinstance(role, str) or len(mine) < MIN_KILLS or len(mine) / len(long) < MIN_SHARE:
            continue
        xact = _ages(mine, "xact_start", policies)
        idle = _ages(mine, "state_change", policies)
        # The cap: a threshold already measured on the transaction's clock, else the ages seen.
        caps = [p.longer_than for r in mine
                if (p := policies.get(str(r.get("policy")))) and p.measured_from == "xact_start"]
        value = nice_value(min(caps + xact, default=60.0))
        evidence = [
            f"role {role}: {rate_text(mine, window)} in long transactions ({len(mine)} of"
            f" {len(long)} such kills on {look.target})",
            f"{_age_text(xact, 'transaction age at kill')};"
            f" {_age_text(idle, 'time in their last state')}: the transactions kept working,"
            " so no idle timeout would have ended them",
            *counted_once(records, mine),
        ]
        if look.version_num >= 170000:
            unset = _unset(look, "transaction_timeout", role, mine)
            if not unset:
                continue
            evidence.append(f"transaction_timeout is 0 for role {role} in database"
                            f" {', '.join(unset)} (read live)")
            fix = _alter_role(look, "transaction_timeout", role, unset, value)
            fix += [*TRANSACTION_TIMEOUT_CAVEATS, WATCHDOG_KEEPS]
        else:
            fix = _policy_fix(look, role, value, mine, policies)
        found.append(Finding("transaction_timeout", "high", look.target, f"role {role}",
                             tuple(evidence), tuple(fix)))
    return found


def _policy_fix(look: Look, role: str, value: str, mine: Sequence[Record],
                policies: Mapping[str, Policy]) -> list[str]:
    major = look.version_num // 10000
    already = sorted({p.name for r in mine if (p := policies.get(str(r.get("policy"))))
                      and p.measured_from == "xact_start"})
    fix = [
        f"PostgreSQL {major} has no transaction_timeout (it comes with 17); a policy measured"
        f" from xact_start does the same for role {role}:",
        f"  - name: {json.dumps(f'long-transactions-{role}', ensure_ascii=False)}",
        "    state: [idle in transaction, idle in transaction (aborted), active]",
        f"    users: [{json.dumps(role, ensure_ascii=False)}]",
        "    measured_from: xact_start",
        f"    longer_than: {value.replace('min', 'm')}",
        "    action: terminate",
    ]
    if already:
        fix.append(f"(policy {', '.join(already)} already measures from xact_start and ended"
                   " these; on 17+ the server can do it itself with transaction_timeout)")
    fix.append("Prepared transactions are not sessions: pg-watchdog reports stale ones"
               " (finding stale_prepared).")
    return fix
