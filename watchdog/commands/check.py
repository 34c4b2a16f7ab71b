"""`pg-watchdog check --connect`: can the watchdog do its job on each target?

Each target gets one line per check, ``ok``, ``FAIL`` (a required privilege or the server
itself is missing: exit 1) or ``warn`` (works, but a DBA should know). A FAIL line names the
GRANT that fixes it. Nothing printed comes from the DSN, so no password can leak.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any

from watchdog.config.policy import Config, Target
from watchdog.core.model import Snapshot
from watchdog.core.reserved import Slots
from watchdog.core.reserved import judge as judge_slots
from watchdog.core.roles import RoleFacts, killable, members_now
from watchdog.pg import queries
from watchdog.pg.connect import (
    STATEMENT_TIMEOUT,
    TargetError,
    close_quietly,
    describe_error,
    open_target,
)
from watchdog.pg.roles import read_roles
from watchdog.pg.snapshot import take_snapshot
from watchdog.pgbouncer.check import check_poolers
from watchdog.text.fit import fit
from watchdog.text.quoting import quote_ident

SUPPORTED_MAJORS = range(15, 19)
OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Check:
    """The result of one check."""

    level: str  # ok | warn | FAIL
    text: str


def _version(row: Any) -> Check:
    num: int = row["version_num"]
    text = f"server is PostgreSQL {row['server_version']}"
    if num // 10000 in SUPPORTED_MAJORS:
        return Check(OK, f"{text} (supported: 15 to 18)")
    if num // 10000 > SUPPORTED_MAJORS[-1]:
        return Check(WARN, f"{text}: newer than the supported 15 to 18, untested")
    return Check(FAIL, f"{text}: not supported (PostgreSQL 15 to 18 are)")


def _role(row: Any, role: str) -> Check:
    if row["rolsuper"]:
        return Check(
            WARN,
            f"connected as {role}, a superuser: least privilege is a role such as watchdog with"
            " GRANT pg_monitor, pg_signal_backend TO watchdog;",
        )
    return Check(OK, f"connected as role {role} (not a superuser)")


def _visibility(row: Any, role: str) -> Check:
    if row["rolsuper"] or row["read_all_stats"]:
        return Check(OK, "can see every session's state and timestamps (pg_read_all_stats)")
    return Check(
        FAIL,
        "cannot see other roles' sessions (state, timestamps read as NULL), so no policy can"
        f" act on them: GRANT pg_monitor TO {role}; (pg_monitor includes pg_read_all_stats)",
    )


def _signalling(row: Any, role: str, config: Config) -> list[Check]:
    if row["rolsuper"]:
        return [Check(OK, "can signal sessions (superuser)")]
    if not row["signal_backend"]:
        return [Check(FAIL, f"cannot signal sessions: GRANT pg_signal_backend TO {role};")]
    checks = [Check(OK, "can signal sessions (pg_signal_backend)")]
    if config.exclude.superusers:
        checks.append(
            Check(
                OK,
                "superuser sessions are excluded (exclude.superusers: true); a non-superuser"
                " role could not signal them anyway",
            )
        )
    else:
        checks.append(
            Check(
                WARN,
                f"exclude.superusers is false, but {role} is not a superuser and can never"
                " signal superuser sessions: those terminations will fail"
                " (set exclude.superusers: true)",
            )
        )
    return checks


def _reserved(row: Any, role: str, snapshot: Snapshot) -> Check:
    verdict = judge_slots(Slots(
        version_num=snapshot.server_version_num,
        reserved=snapshot.reserved if snapshot.server_version_num >= 160000 else 0,
        superuser_reserved=snapshot.superuser_reserved,
        rolsuper=bool(row["rolsuper"]),
        use_reserved=row["use_reserved"],
        role=role,
    ))
    if verdict.ok:
        return Check(OK, verdict.text)
    return Check(WARN, f"{verdict.text}: {' '.join(verdict.fix)}")


def _headroom(snapshot: Snapshot, config: Config, sees_all: bool) -> Check:
    used, cap = snapshot.used, snapshot.capacity
    text = f"headroom {cap - used}: {used} of {cap} ordinary slots used ({100 * used / cap:.0f}%)"
    if not sees_all:
        text += ", approximate (other roles' sessions are not all visible)"
    limit = config.alerts.connections_above
    if used >= cap or (limit is not None and snapshot.saturation > limit):
        return Check(WARN, text)
    return Check(OK, text)


def leadership(holders: list[Any], config: Config) -> Check:
    """Who holds the leader lock now, as the server's pg_locks tells."""
    key = f"leader lock (lock_key {config.lock_key})"
    if not holders:
        return Check(OK, f"{key}: no instance holds it")
    h = holders[0]
    app = f" ({h['application_name']})" if h["application_name"] else ""
    where = f" from {h['client_addr']}" if h["client_addr"] else ""
    since = f" since {h['backend_start']:%Y-%m-%d %H:%M:%S%z}" if h["backend_start"] else ""
    hidden = "" if where or since else " (GRANT pg_monitor to see from where)"
    return Check(OK, f"{key}: held by pid {h['pid']}{app}{where}{since}{hidden}")


def _recovery(snapshot: Snapshot) -> Check:
    if snapshot.in_recovery:
        return Check(OK, "server is a hot standby (in recovery): sweeps and leadership work"
                         " there as on a primary")
    return Check(OK, "server is a primary (not in recovery)")


def _member_roles(config: Config, facts: RoleFacts, snapshot: Snapshot) -> list[Check]:
    listed = config.member_roles()
    if not listed:
        return []
    here = []
    for r in (r for r in listed if r in facts.present):
        n = members_now(snapshot, r)
        verb = "spares" if r in config.exclude.member_of else "matches"
        here.append(f"{r} ({verb} {n} current session{'s' if n != 1 else ''})")
    absent = [r for r in listed if r not in facts.present]
    text = f"member_of roles here: {', '.join(here) or 'none'}"
    if absent:
        text += f"; not on this server (no error): {', '.join(absent)}"
    return [Check(OK, text)]


def _layout(facts: RoleFacts) -> list[Check]:
    return [
        Check(OK, f"{name} layout (role {role} exists): its admin logins are no superusers;"
                  " exclude.member_of spares them")
        for name, role in facts.layouts().items()
    ]


def _admins(
    config: Config, target: str, facts: RoleFacts, keywords: frozenset[str]
) -> list[Check]:
    at_risk = [r for r in facts.roles if r.admin_signs() and killable(r, config, target)]
    if not at_risk:
        return []
    shown = [
        ("the watchdog's own role " if r.is_self else "")
        + f"{quote_ident(r.name, keywords)} ({', '.join(r.admin_signs())})"
        for r in at_risk[:5]
    ]
    more = f" and {len(at_risk) - 5} more" if len(at_risk) > 5 else ""
    return [Check(WARN, f"admin-looking roles the policies may kill: {', '.join(shown)}{more};"
                        " spare them with exclude.member_of or exclude.users")]


def judge(row: Any, server: str, snapshot: Snapshot, config: Config, target: str,
          facts: RoleFacts, keywords: frozenset[str]) -> list[Check]:
    """Every check of one reachable target, from its role row, snapshot and role facts;
    ``keywords`` those the server's quote_ident() quotes, for the SQL printed."""
    role = quote_ident(row["role"], keywords)
    sees_all = bool(row["rolsuper"] or row["read_all_stats"])
    return [
        Check(OK, f"reachable at {server}"),
        _version(row),
        _recovery(snapshot),
        *_layout(facts),
        _role(row, role),
        _visibility(row, role),
        *_signalling(row, role, config),
        _reserved(row, role, snapshot),
        _headroom(snapshot, config, sees_all),
        *_member_roles(config, facts, snapshot),
        *_admins(config, target, facts, keywords),
    ]


async def check_target(config: Config, target: Target) -> list[Check]:
    """The target's checks, then one per pooler in front of it."""
    checks, poolers = await asyncio.gather(_check_server(config, target), check_poolers(target))
    return checks + [Check(OK if ok else FAIL, text) for ok, text in poolers]


async def _check_server(config: Config, target: Target) -> list[Check]:
    """Connect to ``target`` and check it; an unreachable target is a single FAIL."""
    try:
        conn, server = await open_target(target)
    except TargetError as exc:
        reason = str(exc).removeprefix(f"{target.name}: ")
        return [Check(FAIL, f"cannot connect: {reason}")]
    try:
        row = await conn.fetchrow(queries.CHECK_ROLE, timeout=STATEMENT_TIMEOUT)
        snapshot = await take_snapshot(conn, STATEMENT_TIMEOUT, config.member_roles())
        facts = await read_roles(conn, config, STATEMENT_TIMEOUT)
        holders = await conn.fetch(queries.LOCK_HOLDER, config.lock_key, timeout=STATEMENT_TIMEOUT)
        keywords = frozenset(await conn.fetchval(queries.KEYWORDS, timeout=STATEMENT_TIMEOUT))
    except Exception as exc:
        reason = describe_error(target, exc).removeprefix(f"{target.name}: ")
        return [Check(FAIL, f"connected, but the checks failed: {reason}")]
    finally:
        await close_quietly(conn)
    if row is None:  # current_user not in pg_roles: cannot happen on a sane server
        return [Check(FAIL, "connected, but the current role is not in pg_roles")]
    return [
        *judge(row, server, snapshot, config, target.name, facts, keywords),
        leadership(list(holders), config),
    ]


def _show(text: str) -> str:
    return fit(text, 1000)[0]


async def check_targets(config: Config) -> int:
    """Check every target concurrently, print the results; 1 if any check FAILed."""
    results = await asyncio.gather(*(check_target(config, t) for t in config.targets))
    failed: list[str] = []
    for target, checks in zip(config.targets, results, strict=True):
        print(f"target {_show(target.name)}")
        for c in checks:
            print(f"  {c.level:<4}  {_show(c.text)}")
        if any(c.level == FAIL for c in checks):
            failed.append(target.name)
    sys.stdout.flush()
    if failed:
        print(f"pg-watchdog: check failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
