"""The recipes' idle lifetime comes from the policy that killed the sessions (half its
longer_than, capped by the library's own default), and only a library's own default
application_name names the library. The recipes themselves are run in tests/test_clients.py."""

from __future__ import annotations

from watchdog.commands.advise.clients import (
    CLIENTS,
    idle_threshold,
    margin_text,
    recipe_lines,
    recognise,
)
from watchdog.config.policy import Policy

IDLE = Policy("idle", frozenset({"idle"}), 600.0)
QUICK_IDLE = Policy("idle-batch", frozenset({"idle"}), 120.0, users=("batch",))
IIT = Policy("idle-in-transaction", frozenset({"idle in transaction"}), 300.0)
BY_AGE = Policy("old", frozenset({"idle"}), 60.0, measured_from="backend_start")
POLICIES = {p.name: p for p in (IDLE, QUICK_IDLE, IIT, BY_AGE)}


def _kill(policy: str, state: str = "idle") -> dict[str, object]:
    return {"policy": policy, "state": state}


def test_the_policy_that_killed_the_idle_sessions_sets_the_lifetime() -> None:
    assert idle_threshold([_kill("idle"), _kill("idle")], POLICIES) == IDLE
    assert idle_threshold([_kill("idle"), _kill("idle-batch")], POLICIES) == QUICK_IDLE


def test_without_idle_kills_the_quickest_idle_policy_configured_is_used() -> None:
    kills = [_kill("idle-in-transaction", "idle in transaction")]
    # measured_from backend_start is connection age, not idleness: not an idle threshold.
    assert idle_threshold(kills, POLICIES) == QUICK_IDLE
    assert idle_threshold(kills, {"idle-in-transaction": IIT}) is None


def test_half_the_threshold_capped_by_the_librarys_default() -> None:
    lines = dict(line.split(": ", 1) for line in recipe_lines(IDLE))
    assert lines["SQLAlchemy 2 (psycopg 3)"].endswith("pool_recycle=300)")
    assert "max_inactive_connection_lifetime=300" in lines["asyncpg Pool"]
    assert "idleTimeoutMillis: 10000" in lines["node-postgres 8 (pg)"]  # its default, shorter
    assert "pool.on('error'" in lines["node-postgres 8 (pg)"]
    assert lines["HikariCP (PostgreSQL JDBC)"] == "maxLifetime=300000, idleTimeout=270000"
    assert "300" in lines["Django"] and "CONN_HEALTH_CHECKS" in lines["Django"]
    assert "5m00s" in margin_text(IDLE) and "'idle' (10m00s)" in margin_text(IDLE)


def test_hikaricp_floor_is_said_when_the_threshold_is_too_short() -> None:
    short = Policy("idle", frozenset({"idle"}), 20.0)
    [hikari] = recipe_lines(short, next(c for c in CLIENTS if c.name.startswith("HikariCP")))
    assert hikari.startswith("HikariCP (PostgreSQL JDBC): maxLifetime=30000 (30s is")


def test_only_a_librarys_own_default_name_recognises_it() -> None:
    jdbc = recognise("PostgreSQL JDBC Driver")
    assert jdbc is not None and jdbc.name.startswith("HikariCP")
    for chosen in ("", "django-web", "node-api", "billing-worker"):
        assert recognise(chosen) is None
