"""Can the watchdog get back into a full server? One judgement for `check --connect` and `advise`.

On 16+ a role with pg_use_reserved_connections may take the reserved_connections slots that
ordinary roles may not; a superuser takes superuser_reserved_connections. 15 has only the
latter, so there the held connection is what keeps a non-superuser watchdog in.
"""

from __future__ import annotations

from dataclasses import dataclass

SUGGESTED = 3
SET_RESERVED = f"ALTER SYSTEM SET reserved_connections = {SUGGESTED};  -- then restart"


@dataclass(frozen=True)
class Slots:
    """The server's slot settings and the watchdog role's rights, as read live."""

    version_num: int
    reserved: int  # reserved_connections (0 before 16)
    superuser_reserved: int
    rolsuper: bool
    use_reserved: bool | None  # member of pg_use_reserved_connections (None before 16)
    role: str  # quoted for SQL


@dataclass(frozen=True)
class Verdict:
    ok: bool
    text: str  # one line: what is set, and whether the watchdog's role may use it
    fix: tuple[str, ...] = ()  # SQL to paste, when not ok


def judge(s: Slots) -> Verdict:
    """Whether a reconnect of the watchdog's role to a full server gets in, and how to fix it."""
    if s.rolsuper:
        extra = f" (reserved_connections = {s.reserved})" if s.version_num >= 160000 else ""
        return Verdict(True, f"{s.role} is a superuser: may use the {s.superuser_reserved}"
                             f" superuser_reserved_connections when the server is full{extra}")
    if s.version_num < 160000:
        return Verdict(True, f"PostgreSQL 15 reserves slots for superusers only"
                             f" ({s.superuser_reserved}); the watchdog relies on its held"
                             " connection to act on a full server")
    problems: list[str] = []
    fix: list[str] = []
    if s.reserved <= 0:
        problems.append("reserved_connections is 0 (not set)")
    else:
        problems.append(f"reserved_connections = {s.reserved}")
    if not s.use_reserved:
        problems.append(f"{s.role} cannot use them (no pg_use_reserved_connections)")
        fix.append(f"GRANT pg_use_reserved_connections TO {s.role};")
    else:
        problems.append(f"{s.role} may use them (pg_use_reserved_connections)")
    if s.reserved <= 0:
        fix.append(SET_RESERVED)  # last: its comment ends the line
    if not fix:
        return Verdict(True, "; ".join(problems))
    return Verdict(False, "; ".join(problems) + ": a reconnect to a full server fails",
                   tuple(fix))
