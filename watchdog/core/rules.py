"""The rules that spare a session or keep it outside a policy: pure predicates, no I/O.

watchdog/core/decide.py applies them; watchdog/core/candidates.py reuses the exclusions.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

from watchdog.config.policy import Config, Exclusions, Policy
from watchdog.config.yamlfields import Network
from watchdog.core.blockers import describe as describe_blocking
from watchdog.core.model import (
    APPLICATION_NAME,
    CLIENT_BACKEND,
    Blocking,
    PoolerLink,
    Session,
    Snapshot,
)
from watchdog.text.comments import block_end

_LISTEN = re.compile(r"LISTEN\b", re.IGNORECASE)
# A statement starting with one of these is no LISTEN: not whitespace, no comment, and no
# letter that case-folds to L. Most statements start so, and skip the scanner below.
NOT_LISTEN_START = frozenset("ABCDEFGHIJKMNOPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


def is_listen(query: str) -> bool:
    """Whether ``query`` is a LISTEN statement, after any whitespace and SQL comments.

    A scanner rather than one regex: the text comes from the watched sessions and may be
    megabytes long, so this stays linear (no backtracking on hostile input).
    """
    if query[:1] in NOT_LISTEN_START:
        return False
    i, n = 0, len(query)
    while i < n:
        if query[i].isspace():
            i += 1
        elif query.startswith("--", i):
            i = query.find("\n", i)
            if i < 0:
                return False
        elif query.startswith("/*", i):
            i = block_end(query, i)
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


Key = tuple[object, ...]


def _member_of(session: Session, roles: tuple[str, ...]) -> str | None:
    """The first of ``roles`` the session's role is a member of (the snapshot lists them)."""
    return next((r for r in roles if r in session.member_of), None)


def listens_matter(config: Config, policies: Iterable[Policy]) -> bool:
    """Whether any exclusion that applies spares listeners (else no query text is looked at)."""
    return config.exclude.listeners or any(p.exclude.listeners for p in policies)


def key(session: Session, link: PoolerLink | None, listens: bool) -> Key:
    """Everything an exclusion rule or a policy filter looks at: sessions of one application
    (same role, database, address and pooler client) share one answer. Of the last statement
    only whether it was a LISTEN counts (``listens``: whether any rule asks), so sessions
    whose statements vary still share it."""
    query = session.query
    return (
        session.rolsuper,
        session.usename,
        session.application_name,
        session.datname,
        session.client_addr,
        listens and query is not None and is_listen(query),
        session.member_of,
        pooled_key(link),
    )


# -- behind a pooler: the real client's address counts as much as the backend's own ------


def pooled_key(link: PoolerLink | None) -> object:
    if link is None:
        return None
    real = None if link.client is None else link.client.addr
    return (link.pooler, link.client is None, real, link.unknown)


def _addrs_in(session: Session, link: PoolerLink | None, networks: tuple[Network, ...]) -> str:
    """The first of the real client's and the backend's addresses in ``networks``, or ''."""
    real = link.client.addr if link is not None and link.client is not None else None
    for addr in (real, session.client_addr):
        if _in_networks(addr, networks):
            return addr or ""
    return ""


def _pooled_exclusion(ex: Exclusions, link: PoolerLink | None) -> str | None:
    if link is not None and link.unknown is not None:
        # Whatever ``ex`` says: exclusions by real client cannot be judged (fail closed).
        return f"pooler {link.pooler} {link.unknown.value}: real client unknown"
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
    if ex.listeners and session.query is not None and is_listen(session.query):
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


def outside_filters(session: Session, policy: Policy, link: PoolerLink | None) -> str | None:
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


def not_harmful(policy: Policy, blocking: Blocking | None) -> tuple[str, float] | None:
    """Why a ``blocking`` policy passes over a session, and in how many seconds it may not."""
    if blocking is None:
        return "blocks nobody", 0.0
    wanted = policy.blocking_longer_than
    if wanted is not None and blocking.longest_wait_s < wanted:
        why = f"{describe_blocking(blocking)}, acts past {wanted:g}s of waiting"
        return why, wanted - blocking.longest_wait_s
    return None


