"""Table tests of advise's pure analysis: records and a live look built by hand (no server).

The real-server scenario (real kills, the fix applied) is in test_advise.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from watchdog.advise import Finding, Window, analyse, nice_value
from watchdog.advise_look import LiveSession, Look, pg_ms
from watchdog.config import Config, Limits, Policy, Target

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
IIT = "idle in transaction"


def config(*policies: Policy, dry_run: bool = False, max_per_sweep: int = 50) -> Config:
    return Config(
        source="t.yaml",
        targets=(Target("main", "postgresql://watchdog@db/postgres", None, 30.0),),
        policies=policies or (
            Policy("idle", frozenset({"idle"}), 600.0),
            Policy("idle-in-transaction", frozenset({IIT}), 30.0),
        ),
        dry_run=dry_run,
        limits=Limits(max_per_sweep),
    )


def rec(i: int = 0, *, user: str = "leaky", app: str = "leaky-app", state: str = IIT,
        policy: str = "idle-in-transaction", outcome: str = "terminated", age: float = 42.0,
        action: str = "terminate", ago: float = 60.0, sweep: str | None = None,
        **extra: Any) -> dict[str, Any]:
    ts = (NOW - timedelta(seconds=ago + i)).isoformat().replace("+00:00", "Z")
    return {"ts": ts, "target": "main", "policy": policy, "action": action, "outcome": outcome,
            "usename": user, "datname": "app", "application_name": app,
            "client_addr": f"10.0.0.{i % 3 + 1}", "state": state, "age_s": age,
            "sweep": sweep or f"s{i}", "dry_run": outcome.startswith("would_"), **extra}


def look(version: int = 180000, **kw: Any) -> Look:
    settings = {"max_connections": "100", "superuser_reserved_connections": "3",
                "reserved_connections": "3", "idle_in_transaction_session_timeout": "0",
                "statement_timeout": "0", "idle_session_timeout": "0", "work_mem": "4096",
                "server_version_num": str(version)}
    settings.update(kw.pop("settings", {}))
    base = Look("main", settings, {k: "ms" for k in settings if "timeout" in k}, {}, (), (),
                role="watchdog", use_reserved=True, peak_used=10)
    return replace(base, **kw)


def run(records: list[dict[str, Any]], lk: Look | None = None, cfg: Config | None = None,
        start: float = 3600.0) -> list[Finding]:
    window = Window(NOW - timedelta(seconds=start), NOW)
    return analyse(cfg or config(), records, {"main": lk or look()}, window, ["main"])


def ids(findings: list[Finding]) -> list[str]:
    return [f.id for f in findings]


def test_quiet_server_with_sensible_settings_has_no_findings() -> None:
    assert run([]) == []


def test_leak_and_iit_timeout_name_the_role_and_the_value_from_the_threshold() -> None:
    records = [rec(i) for i in range(20)] + [rec(50, user="good", app="good-app")]
    found = run(records)
    assert ids(found)[:2] == ["leak", "idle_in_transaction_timeout"]
    leak, iit = found[0], found[1]
    assert leak.subject == "application 'leaky-app' (role leaky)"
    assert "20 of the 21 kills" in leak.evidence[0]
    assert "everyone else: 1 kills" in leak.evidence[2]
    assert iit.fix[0] == "ALTER ROLE leaky SET idle_in_transaction_session_timeout = '30s';"
    assert not any("good" in json.dumps(f.as_json()) for f in found)


def test_a_burst_counts_as_much_as_a_slow_leak() -> None:
    # 20 kills in 20 seconds within a 7-day window: judged by count and share.
    found = run([rec(i, ago=5) for i in range(20)], start=7 * 86400)
    assert "idle_in_transaction_timeout" in ids(found)


def test_few_kills_or_a_small_share_is_no_pattern() -> None:
    assert run([rec(i) for i in range(4)]) == []
    others = [rec(i, user=f"u{i}", app=f"a{i}") for i in range(30)]
    assert run([rec(i) for i in range(5)] + others) == []


def test_timeout_already_set_for_the_role_or_database_gives_no_timeout_finding() -> None:
    records = [rec(i) for i in range(10)]
    setting = {"idle_in_transaction_session_timeout": "1min"}
    for key in (("leaky", None), ("leaky", "app"), (None, "app")):
        found = run(records, look(role_settings={key: setting}))
        assert "idle_in_transaction_timeout" not in ids(found), key
    found = run(records, look(settings={"idle_in_transaction_session_timeout": "60000"}))
    assert "idle_in_transaction_timeout" not in ids(found)


def test_role_names_are_quoted_in_the_sql() -> None:
    found = run([rec(i, user='Leaky "App"') for i in range(10)])
    [iit] = [f for f in found if f.id == "idle_in_transaction_timeout"]
    assert iit.fix[0].startswith('ALTER ROLE "Leaky ""App""" SET')


def test_statement_timeout_for_a_role_whose_queries_are_cancelled() -> None:
    cancel = Policy("long-query", frozenset({"active"}), 300.0, action="cancel")
    records = [rec(i, user="report", app="metabase", state="active", policy="long-query",
                   action="cancel", outcome="cancelled", age=400) for i in range(6)]
    found = run(records, cfg=config(cancel))
    [st] = [f for f in found if f.id == "statement_timeout"]
    assert st.fix[0] == "ALTER ROLE report SET statement_timeout = '5min';"


def test_idle_session_timeout_only_without_a_pooler_and_with_the_docs_warning() -> None:
    records = [rec(i, user="web", app="web", state="idle", policy="idle", age=700)
               for i in range(6)]
    [isf] = [f for f in run(records) if f.id == "idle_session_timeout"]
    assert isf.fix[0] == "ALTER ROLE web SET idle_session_timeout = '10min';"
    assert any("connection-pooling" in x and "postgres_fdw" in x for x in isf.fix)
    pooled = [dict(r, pooler_client={"addr": "10.9.9.9", "application_name": "web"})
              for r in records]
    assert "idle_session_timeout" not in ids(run(pooled))


def test_leak_names_the_real_clients_behind_the_pooler_and_the_pool_knob() -> None:
    records = [rec(i, app="django-web", pooler_client={"addr": f"10.8.0.{i % 2}"})
               for i in range(8)]
    [leak] = [f for f in run(records) if f.id == "leak"]
    assert any("behind the pooler" in e and "10.8.0.0" in e for e in leak.evidence)
    assert any("CONN_MAX_AGE" in x for x in leak.fix)
    assert not any("HikariCP" in x for x in leak.fix)


def test_pooling_pods_times_pool_size() -> None:
    sessions = tuple(
        LiveSession("api", "api", f"10.1.0.{pod}", "idle" if k else "active", "client backend")
        for pod in range(6) for k in range(4)
    )
    [p] = [f for f in run([], look(sessions=sessions, peak_active={"api": 4}))
           if f.id == "pooling"]
    assert "24 sessions from 6 client addresses" in p.evidence[0]
    assert any("default_pool_size = ceil(1.5 x peak active 4) = 6" in x for x in p.fix)


def test_capacity_saturation_and_memory() -> None:
    [c] = run([], look(peak_used=90))
    assert c.id == "capacity" and "90 of 94 ordinary slots" in c.evidence[0]
    [c] = run([], look(settings={"max_connections": "1000"}))
    assert "implies 4.9-9.8 GB" in c.evidence[0] and "work_mem (4 MB" in c.evidence[0]


def test_on_15_capacity_says_the_held_connection_keeps_the_watchdog_in() -> None:
    [c] = run([], look(version=150000, peak_used=90))
    assert any("held connection" in x for x in c.fix)


def test_reserved_connections() -> None:
    [r] = run([], look(settings={"reserved_connections": "0"}))
    assert r.fix == ("ALTER SYSTEM SET reserved_connections = 3;  -- then restart",
                     "GRANT pg_use_reserved_connections TO watchdog;")
    [r] = run([], look(use_reserved=False))
    assert r.fix == ("GRANT pg_use_reserved_connections TO watchdog;",)
    assert run([], look(settings={"reserved_connections": "0"}, rolsuper=True))[0].fix == (
        "ALTER SYSTEM SET reserved_connections = 3;  -- then restart",)
    assert run([], look(version=150000, settings={"reserved_connections": "0"})) == []


def test_policy_unused_needs_a_day_and_other_policies_acting() -> None:
    records = [rec(i, user=f"u{i}", app=f"a{i}") for i in range(3)]
    assert ids(run(records, start=3600)) == []
    [u] = run(records, start=2 * 86400)
    assert (u.id, u.subject) == ("policy_unused", "policy idle")


def test_dry_run_left_on_for_days() -> None:
    records = [rec(i, user=f"u{i}", app=f"a{i}", outcome="would_terminate", ago=5 * 86400)
               for i in range(3)]
    found = run(records, cfg=config(dry_run=True), start=6 * 86400)
    assert "dry_run_left_on" in ids(found)
    assert "dry_run_left_on" not in ids(run(records, start=6 * 86400))


def test_max_per_sweep_reached_often() -> None:
    records = [rec(i, user=f"u{i}", app=f"a{i}", sweep=f"s{i // 2}") for i in range(6)]
    assert "max_per_sweep" in ids(run(records, cfg=config(max_per_sweep=2)))
    assert "max_per_sweep" not in ids(run(records, cfg=config(max_per_sweep=3)))


def test_unreachable_target_keeps_the_audit_findings() -> None:
    window = Window(NOW - timedelta(hours=1), NOW)
    found = analyse(config(), [rec(i) for i in range(10)], {}, window, ["main"])
    assert ids(found) == ["leak"]


@pytest.mark.parametrize(("text", "ms"), [("0", 0.0), ("5min", 300000.0), ("30s", 30000.0),
                                          ("500", 500.0), ("'1h'", 3600000.0), ("x", None)])
def test_pg_ms(text: str, ms: float | None) -> None:
    assert pg_ms(text) == ms


@pytest.mark.parametrize(("seconds", "text"), [(0.5, "500ms"), (30, "30s"), (30.2, "31s"),
                                               (300, "5min"), (125, "3min")])
def test_nice_value(seconds: float, text: str) -> None:
    assert nice_value(seconds) == text
