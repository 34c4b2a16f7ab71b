"""Managed PostgreSQL (RDS/Aurora, Azure, Cloud SQL): the roles that tell the layout apart (pure).

There the admin login is no superuser but a member of a provider role, so `exclude.superusers`
does not spare it. `check --connect` reads these facts to say which member_of roles exist,
what they spare, and which admin-looking login roles the current policies could still kill.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from watchdog.config.policy import PROVIDER_ADMIN_ROLES, Config, Exclusions
from watchdog.core.model import CLIENT_BACKEND, Snapshot

# A role whose existence gives the provider away (rdsadmin is RDS's own superuser).
PROVIDER_ROLES = {
    "rdsadmin": "Amazon RDS/Aurora",
    "rds_superuser": "Amazon RDS/Aurora",
    "azure_pg_admin": "Azure Database for PostgreSQL",
    "cloudsqlsuperuser": "Google Cloud SQL",
}
# The roles each provider makes its admin login a member of: config's list, in name order.
ADMIN_GROUPS = tuple(sorted(PROVIDER_ADMIN_ROLES))


@dataclass(frozen=True)
class Role:
    """A login role that may be an admin's, or the watchdog's own."""

    name: str
    rolsuper: bool
    createrole: bool
    createdb: bool
    is_self: bool
    member_of: tuple[str, ...]  # of the listed and provider roles, those it is a member of

    def admin_signs(self) -> list[str]:
        """Why this role looks like an administrator's (empty: it does not)."""
        signs = [f"member of {g}" for g in ADMIN_GROUPS if g in self.member_of]
        signs += [flag for flag, on in (("CREATEROLE", self.createrole),
                                        ("CREATEDB", self.createdb)) if on]
        if not signs and "admin" in self.name.lower():
            signs.append("named like an admin")
        return signs


@dataclass(frozen=True)
class RoleFacts:
    """What one server says about the roles that matter here."""

    present: frozenset[str]  # the listed and provider roles that exist
    roles: tuple[Role, ...]  # admin-looking login roles, and the watchdog's own (first)

    def layouts(self) -> dict[str, str]:
        """The managed services whose layout this server has, each with a role that shows it."""
        found: dict[str, str] = {}
        for role, provider in PROVIDER_ROLES.items():
            if role in self.present:
                found.setdefault(provider, role)
        return found


def _spared(role: Role, ex: Exclusions) -> bool:
    # The rules that look at the role alone: any session of it is spared, whatever its app.
    return ((ex.superusers and role.rolsuper)
            or any(fnmatchcase(role.name, p) for p in ex.users)
            or any(r in role.member_of for r in ex.member_of))


def killable(role: Role, config: Config, target: str) -> bool:
    """Whether some policy for ``target`` may act on an ordinary session of ``role``."""
    if _spared(role, config.exclude):
        return False
    for p in config.policies:
        if p.targets is not None and target not in p.targets:
            continue
        if p.users and not any(fnmatchcase(role.name, u) for u in p.users):
            continue
        if p.member_of and not any(r in role.member_of for r in p.member_of):
            continue
        if not _spared(role, p.exclude):
            return True
    return False


def members_now(snapshot: Snapshot, role: str) -> int:
    """Current client sessions (not the watchdog's) whose role is a member of ``role``."""
    return sum(1 for s in snapshot.sessions
               if s.backend_type == CLIENT_BACKEND and s.pid != snapshot.own_pid
               and role in s.member_of)
