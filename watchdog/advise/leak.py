"""`advise` finding from the audit log alone: the application the watchdog keeps killing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from watchdog.advise.findings import (
    IIT,
    MIN_KILLS,
    MIN_SHARE,
    Finding,
    Record,
    Window,
    age_text,
    client_of,
    counted_once,
    group,
    kills_of,
    rate_text,
    through_pooler,
    top,
)

# The usual pools' knobs: (application_name fragments, the pool, the knob).
POOLS = (
    (("sqlalchemy", "alembic", "flask", "fastapi"), "SQLAlchemy",
     "create_engine(..., pool_pre_ping=True, pool_recycle=300)"),
    (("django",), "Django", "DATABASES[...]['CONN_MAX_AGE'] = 60 and CONN_HEALTH_CHECKS = True"),
    (("node", "pg-pool", "express", "nest"), "node-postgres",
     "new Pool({ idleTimeoutMillis: 10000, max: ... })"),
    (("hikari", "jdbc", "java", "spring"), "HikariCP",
     "idleTimeout=60000, maxLifetime=1800000 (and leakDetectionThreshold to find the leak)"),
)


def pool_for(application: str) -> tuple[str, str] | None:
    name = application.lower()
    for fragments, pool, knob in POOLS:
        if any(f in name for f in fragments):
            return pool, knob
    return None



def leak(target: str, records: Sequence[Record], window: Window) -> list[Finding]:
    """The application (and role) the watchdog keeps killing, against everyone else."""
    kills = kills_of(records)
    found = []
    for (app, role), mine in group(kills, "application_name", "usename").items():
        if len(mine) < MIN_KILLS or len(mine) / len(kills) < MIN_SHARE:
            continue
        mine_ids = {id(r) for r in mine}
        others = [r for r in kills if id(r) not in mine_ids]
        states = Counter(str(r.get("state")) for r in mine)
        clients = Counter(c for r in mine if (c := client_of(r)) is not None)
        evidence = [
            f"{rate_text(mine, window)}: {len(mine)} of the {len(kills)} kills on {target}"
            f" ({100 * len(mine) / len(kills):.0f}%)",
            f"state at kill: {top(states)}; {age_text(mine)}",
            f"everyone else: {len(others)} kills" + (f", {age_text(others)}" if others else ""),
        ]
        if len(clients) > 1 or through_pooler(mine):
            behind = " (real clients behind the pooler)" if through_pooler(mine) else ""
            evidence.append(f"from {len(clients)} client addresses{behind}: {top(clients)}")
        evidence += counted_once(records, mine)
        found.append(
            Finding("leak", "high", target, f"application '{app}' (role {role})",
                    tuple(evidence), tuple(_leak_fix(str(app), states)))
        )
    return found


def _leak_fix(app: str, states: Counter[str]) -> list[str]:
    fix = []
    if any(s in IIT for s in states):
        fix.append(
            f"In '{app}': end every transaction on every path (commit or rollback in a finally"
            " block or a context manager); a session left idle in transaction holds its locks"
            " and its slot."
        )
    known = pool_for(app)
    if known:
        fix.append(f"Let its pool ({known[0]}) retire and re-check connections: {known[1]}.")
    else:
        fix.append("Let its pool retire idle connections and check them before use:")
        fix += [f"  {pool}: {knob}" for _, pool, knob in POOLS]
    return fix


