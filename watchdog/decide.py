"""The policy decision: a pure function from a snapshot and a config to actions.

No I/O here. Everything that may spare a session is decided in this module,
so the safety rules can be tested exhaustively without a server.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

from watchdog.blockers import describe as describe_blocking
from watchdog.config import Config, Exclusions, Policy
from watchdog.model import (
    APPLICATION_NAME,
    CLIENT_BACKEND,
    Action,
    Blocking,
    Decision,
    PoolerLink,
    Session,
    Snapshot,
    Verdict,
)
from watchdog.yamlfields import Network

_LISTEN = re.compile(r"LISTEN\b", re.IGNORECASE)


def _after_block_comment(query: str, i: int) -> int:
    """Index just past the block comment opening at ``i`` (they nest), or -1 if unclosed."""
    depth = 0
    opening, closing = i, query.find("*/", i + 2)
    while closing >= 0:
        if 0 <= opening < closing:
            depth, i = depth + 1, opening + 2
        else:
            depth, i = depth - 1, closing + 2
            if depth == 0:
                return i
        # Each search starts where the last one stopped: linear in the query's length.
        if 0 <= opening < i:
            opening = query.find("/*", i)
        if closing < i:
            closing = query.find("*/", i)
    return -1


def _is_listen(query: str) -> bool:
    """Whether ``query`` is a LISTEN statement, after any whitespace and SQL comments.

    A scanner rather than one regex: the text comes from the watched sessions and may be
    megabytes long, so this stays linear (no backtracking on hostile input).
    """
    i, n = 0, len(query)
    while i < n:
        if query[i].isspace():
            i += 1
        elif query.startswith("--", i):
            i = query.find("\n", i)
            if i < 0:
                return False
        elif query.startswith("/*", i):
            i = _after_block_comment(query, i)
            if i < 0:
                return False
        else:
            break
    return _LISTEN.match(query, i) is not None


def _glob_any(value: str | None, patterns: Iterable[str]) -> bool:
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


def _in_networks(addr: str | None, networks: tuple[Network, ...]) -> bool:
    if addr is None or not networks:
        return False
    try:
        ip = ipaddress.ip_address(addr.split("/")[0])
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in networks)


_Key = tuple[object, ...]
_UNSEEN = "?"  # not a possible reason


def _member_of(session: Session, roles: tuple[str, ...]) -> str | None:
    """The first of ``roles`` the session's role is a member of (the snapshot lists them)."""
    return next((r for r in roles if r in session.member_of), None)


def _key(session: Session, link: PoolerLink | None) -> _Key:
    """Everything an exclusion rule or a policy filter looks at: sessions of one application
    (same role, database, address, pooler client and last statement) share one answer."""
    return (
        session.rolsuper,
        session.usename,
        session.application_name,
        session.datname,
        session.client_addr,
        session.query,
        session.member_of,
        _pooled_key(link),
    )


# -- behind a pooler: the real client's address counts as much as the backend's own ------


def _pooled_key(link: PoolerLink | None) -> object:
    if link is None:
        return None
    return (link.pooler, link.client is None, None if link.client is None else link.client.addr)


def _addrs_in(session: Session, link: PoolerLink | None, networks: tuple[Network, ...]) -> str:
    """The first of the real client's and the backend's addresses in ``networks``, or ''."""
    real = link.client.addr if link is not None and link.client is not None else None
    for addr in (real, session.client_addr):
        if _in_networks(addr, networks):
            return addr or ""
    return ""


def _pooled_exclusion(ex: Exclusions, link: PoolerLink | None) -> str | None:
    if ex.pooled and link is not None and link.client is None:
        # The pool doing its job; PgBouncer's server_idle_timeout retires these.
        return f"pooled by {link.pooler} (no client)"
    return None


def excluded_by(session: Session, ex: Exclusions, link: PoolerLink | None = None) -> str | None:
    """The exclusion rule that spares ``session`` (``link``: its pooler, if any), or None."""
    if (pooled := _pooled_exclusion(ex, link)) is not None:
        return pooled
    if ex.superusers and session.rolsuper is not False:
        # Unknown role (NULL rolsuper) is treated as superuser: never guess in favour of killing.
        return "superuser"
    if _glob_any(session.usename, ex.users):
        return f"excluded user {session.usename!r}"
    if (role := _member_of(session, ex.member_of)) is not None:
        return f"member of {role}"
    if _glob_any(session.application_name, ex.applications):
        return f"excluded application {session.application_name!r}"
    if _glob_any(session.datname, ex.databases):
        return f"excluded database {session.datname!r}"
    if addr := _addrs_in(session, link, ex.client_addrs):
        return f"excluded client address {addr}"
    if ex.listeners and session.query is not None and _is_listen(session.query):
        return "listener (last statement was LISTEN)"
    return None


def never_touched(session: Session, snapshot: Snapshot) -> str | None:
    """Rules no configuration can override."""
    if session.backend_type != CLIENT_BACKEND:
        return f"not a client backend ({session.backend_type})"
    if session.pid == snapshot.own_pid:
        return "the watchdog's own connection"
    if session.leader_pid is not None:
        return "parallel worker"
    if (
        session.application_name == APPLICATION_NAME
        and session.usename is not None
        and session.usename == snapshot.own_role
    ):
        # Any client may call itself pg-watchdog; only the watchdog's own role makes it one.
        return "another pg-watchdog instance (same role)"
    if session.backend_start is None or session.state is None:
        return "details not visible (grant pg_monitor to the watchdog role)"
    return None


def _outside_filters(session: Session, policy: Policy, link: PoolerLink | None) -> str | None:
    if policy.users and not _glob_any(session.usename, policy.users):
        return "user not in the policy's users"
    if policy.applications and not _glob_any(session.application_name, policy.applications):
        return "application not in the policy's applications"
    if policy.databases and not _glob_any(session.datname, policy.databases):
        return "database not in the policy's databases"
    if policy.client_addrs and not _addrs_in(session, link, policy.client_addrs):
        return "client address not in the policy's client_addrs"
    if policy.member_of and _member_of(session, policy.member_of) is None:
        return "role not a member of the policy's member_of"
    return excluded_by(session, policy.exclude, link)


def _not_harmful(policy: Policy, blocking: Blocking | None) -> tuple[str, float] | None:
    """Why a ``blocking`` policy passes over a session, and in how many seconds it may not."""
    if blocking is None:
        return "blocks nobody", 0.0
    wanted = policy.blocking_longer_than
    if wanted is not None and blocking.longest_wait_s < wanted:
        why = f"{describe_blocking(blocking)}, acts past {wanted:g}s of waiting"
        return why, wanted - blocking.longest_wait_s
    return None


def decide(
    snapshot: Snapshot, config: Config, target: str, dry_run: bool = False, explain: bool = True
) -> Decision:
    """The actions one sweep of ``target`` takes, oldest first, within limits.max_per_sweep."""
    policies = [p for p in config.policies if p.targets is None or target in p.targets]
    saturation = snapshot.saturation
    actions: list[Action] = []
    verdicts: list[Verdict] = []
    next_due: float | None = None
    spared: dict[_Key, str | None] = {}
    outside_of: list[dict[_Key, str | None]] = [{} for _ in policies]
    pooled = snapshot.pooled
    for s in snapshot.sessions:
        reason = never_touched(s, snapshot)
        if reason is None:
            link = pooled.get(s.pid) if pooled else None
            key = _key(s, link)
            reason = spared.get(key, _UNSEEN)
            if reason is _UNSEEN:
                reason = spared[key] = excluded_by(s, config.exclude, link)
        if reason is not None:
            if explain:
                verdicts.append(Verdict(s, None, reason, acting=False))
            continue
        verdict: Verdict | None = None
        why_not: list[str] = []
        for p, known in zip(policies, outside_of, strict=True):
            if s.state not in p.states:
                continue
            outside = known.get(key, _UNSEEN)
            if outside is _UNSEEN:
                outside = known[key] = _outside_filters(s, p, link)
            if outside is not None:
                why_not.append(f"{p.name}: {outside}")
                continue
            since = s.since(p.measured_from)
            if since is None:
                why_not.append(f"{p.name}: no {p.measured_from}")
                continue
            age = (snapshot.now - since).total_seconds()
            if p.connections_above is not None and saturation <= p.connections_above:
                why_not.append(
                    f"{p.name}: server at {saturation:.0%}, acts above {p.connections_above:.0%}"
                )
                continue
            if p.blocking:
                # Computed once per snapshot, on first use: nothing while nobody waits.
                harmless = _not_harmful(p, snapshot.blocking.get(s.pid))
                if harmless is not None:
                    why_not.append(f"{p.name}: {harmless[0]}")
                    if harmless[1] > 0:
                        due = max(harmless[1], p.longer_than - age)
                        next_due = due if next_due is None else min(next_due, due)
                    continue
            if age <= p.longer_than:
                # The first matching policy claims the session, due or not (as in
                # pg_hba.conf): a gentler specific rule first is never overridden by a
                # stricter generic one after it.
                due = p.longer_than - age
                next_due = due if next_due is None else min(next_due, due)
                if explain:
                    reason = "; ".join([*why_not, f"{p.name}: not yet due"])
                    verdict = Verdict(s, p.name, reason, False, due)
                break
            actions.append(
                Action(
                    target,
                    p.name,
                    p.action,
                    dry_run or config.dry_run or p.dry_run,
                    s,
                    p.measured_from,
                    age,
                    snapshot.blocking.get(s.pid),
                    link,
                )
            )
            if explain:
                why = f"{p.name}: {s.state} past {p.longer_than:g}s"
                if p.blocking:
                    why += f", {describe_blocking(snapshot.blocking.get(s.pid))}"
                verdict = Verdict(s, p.name, why, True, 0.0)
            break
        if not explain:
            continue
        if verdict is None:
            verdict = Verdict(
                s, None, "; ".join(why_not) or f"no policy for state {s.state!r}", False
            )
        verdicts.append(verdict)
    actions.sort(key=lambda a: (-a.age_s, a.session.pid))
    limit = config.limits.max_per_sweep
    return Decision(tuple(actions[:limit]), tuple(verdicts), max(len(actions) - limit, 0), next_due)
