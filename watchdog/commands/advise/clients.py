"""The client-pool recipes `advise` prints: one line per library, each proven by
tests/test_clients.py against the real library and a real server.

A recipe does two things: the pool survives a connection the watchdog terminated (the next
request still succeeds), and it retires idle connections itself before the watchdog's idle
threshold, so pg-watchdog only ever meets real leaks. The idle lifetime is half of the
threshold of the policy that killed the sessions, capped by the library's own default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from watchdog.config.policy import Policy
from watchdog.config.units import format_duration
from watchdog.config.vocab import State

Record = Mapping[str, object]
# Half the threshold: room for pools that look at their idle connections only now and then
# (HikariCP's housekeeper every 30s, psycopg_pool's shrink task every max_idle).
MARGIN = 0.5
HIKARI_FLOOR_S = 30.0  # HikariCP refuses a maxLifetime under 30s
HIKARI_HOUSEKEEPING_S = 30.0  # idle connections are retired up to this much late


@dataclass(frozen=True)
class Client:
    """One client library: how it names itself, how to name it, and its recipe."""

    name: str
    default_application_name: str  # what the library sends when the app sets nothing
    naming: str  # how to set application_name (the value shown is my-app)
    recipe: Callable[[float | None], str]  # the idle lifetime in seconds, or None: unknown


def _s(lifetime: float | None) -> int | None:
    """Whole seconds, at least 1."""
    return None if lifetime is None else max(int(lifetime), 1)


def _capped(lifetime: float | None, default: float) -> int:
    """Whole seconds, never above the library's own default (already short enough)."""
    return int(default) if lifetime is None else max(int(min(lifetime, default)), 1)


def _sqlalchemy(lifetime: float | None) -> str:
    recycle = _s(lifetime)
    tail = f", pool_recycle={recycle}" if recycle is not None else ""
    return f"create_engine(url, pool_pre_ping=True{tail})"


def _django(lifetime: float | None) -> str:
    age = _s(lifetime)
    return f'DATABASES["default"] |= {{"CONN_MAX_AGE": {age if age is not None else 60},' \
        ' "CONN_HEALTH_CHECKS": True}'


def _psycopg_pool(lifetime: float | None) -> str:
    idle = _capped(lifetime, 600.0)  # max_idle's default: 10 min
    return f"ConnectionPool(conninfo, check=ConnectionPool.check_connection, max_idle={idle})"


def _asyncpg(lifetime: float | None) -> str:
    idle = _capped(lifetime, 300.0)  # max_inactive_connection_lifetime's default: 5 min
    return f"asyncpg.create_pool(dsn, max_inactive_connection_lifetime={idle})"


def _node_postgres(lifetime: float | None) -> str:
    idle = _capped(lifetime, 10.0)  # idleTimeoutMillis's default: 10 s
    return (
        f"const pool = new Pool({{ ...config, idleTimeoutMillis: {idle * 1000} }});"
        " pool.on('error', (err) => console.error('pg pool: idle client lost:', err.message));"
    )


def _hikari(lifetime: float | None) -> str:
    life = max(_capped(lifetime, 1800.0), int(HIKARI_FLOOR_S))  # maxLifetime's default: 30 min
    idle = life - int(HIKARI_HOUSEKEEPING_S)
    tail = f", idleTimeout={idle * 1000}" if idle >= 10 else ""
    if lifetime is not None and lifetime < HIKARI_FLOOR_S:
        tail += " (30s is HikariCP's floor, above this lifetime: the watchdog will still end" \
            " idle connections, which HikariCP replaces on borrow)"
    return f"maxLifetime={life * 1000}{tail}"


CLIENTS: tuple[Client, ...] = (
    Client("SQLAlchemy 2 (psycopg 3)", "", "URL …/db?application_name=my-app", _sqlalchemy),
    Client("Django", "", 'DATABASES["default"]["OPTIONS"] = {"application_name": "my-app"}',
           _django),
    Client("psycopg_pool", "", "conninfo …/db?application_name=my-app", _psycopg_pool),
    Client("asyncpg Pool", "", "DSN …/db?application_name=my-app", _asyncpg),
    Client("node-postgres 8 (pg)", "", "connectionString …/db?application_name=my-app",
           _node_postgres),
    Client("HikariCP (PostgreSQL JDBC)", "PostgreSQL JDBC Driver",
           "jdbcUrl jdbc:postgresql://…/db?ApplicationName=my-app", _hikari),
)


def recognise(application_name: str) -> Client | None:
    """The library whose default application_name this is, when only one library sends it."""
    if not application_name:
        return None
    found = [c for c in CLIENTS if c.default_application_name == application_name]
    return found[0] if len(found) == 1 else None


def idle_threshold(kills: Iterable[Record], policies: Mapping[str, Policy]) -> Policy | None:
    """The policy a healthy pool's idle connections must stay under: of those that killed
    these sessions while idle, the quickest; else the quickest idle policy configured."""
    def idle(p: Policy) -> bool:
        return State.IDLE in p.states and p.measured_from == "state_change"

    killers = {str(r.get("policy")) for r in kills if r.get("state") == State.IDLE}
    chosen = [p for n in killers if (p := policies.get(n)) is not None and idle(p)]
    chosen = chosen or [p for p in policies.values() if idle(p)]
    return min(chosen, key=lambda p: (p.longer_than, p.name)) if chosen else None


def lifetime_of(policy: Policy | None) -> float | None:
    return None if policy is None else policy.longer_than * MARGIN


def margin_text(policy: Policy | None) -> str:
    """Where the idle lifetimes in the recipes come from, stated once per finding."""
    if policy is None:
        return "(no idle policy is configured: the libraries' own idle lifetimes are shown)"
    life = lifetime_of(policy)
    assert life is not None
    return (
        f"(idle lifetimes at most {format_duration(life)}: half the longer_than of policy"
        f" '{policy.name}' ({format_duration(policy.longer_than)}), a margin for pools that"
        " look at their idle connections only now and then, so a healthy pool retires them"
        " before the watchdog would)"
    )


def recipe_lines(policy: Policy | None, only: Client | None = None) -> list[str]:
    """One line per library (or only ``only``'s): `name: recipe`."""
    life = lifetime_of(policy)
    return [f"{c.name}: {c.recipe(life)}" for c in ([only] if only else CLIENTS)]


def naming_lines() -> list[str]:
    return [f"{c.name}: {c.naming}" for c in CLIENTS]
