"""The catalog reads behind core.roles: which provider roles exist, who looks like an admin."""

from __future__ import annotations

from typing import Any

from watchdog.config.policy import Config
from watchdog.core.roles import ADMIN_GROUPS, PROVIDER_ROLES, Role, RoleFacts
from watchdog.pg import queries
from watchdog.pg.snapshot import server_text


async def read_roles(conn: Any, config: Config, timeout: float) -> RoleFacts:
    """Read :class:`RoleFacts` from a connected server (two small catalog queries)."""
    wanted = sorted({*config.member_roles(), *PROVIDER_ROLES})
    present = await conn.fetch(queries.ROLES_PRESENT, wanted, timeout=timeout)
    rows = await conn.fetch(queries.ADMIN_ROLES, wanted, list(ADMIN_GROUPS), timeout=timeout)
    roles = tuple(
        Role(server_text(r["rolname"]) or "", r["rolsuper"], r["rolcreaterole"],
             r["rolcreatedb"], r["is_self"], tuple(r["member_of"]))
        for r in rows
    )
    return RoleFacts(frozenset(r[0] for r in present), roles)
