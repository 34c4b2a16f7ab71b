"""Table tests of advise's pure analysis: records and a live look built by hand (no server).

The real-server scenario (real kills, the fix applied) is in test_advise.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from watchdog.commands.advise.analyse import analyse
from watchdog.commands.advise.findings import Finding, Window, nice_value
from watchdog.commands.advise.look import LiveSession, Look, pg_ms
from watchdog.config.policy import Config, Limits, Policy, Target
from watchdog.pg.prepared import PreparedXact

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
IIT = "idle in transaction"
# Some of the keywords PostgreSQL 18's quote_ident() quotes (the real-server tests read all).
KEYWORDS = frozenset({"all", "current_user", "session_user", "user", "select", "table"})


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


def iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rec(i: int = 0, *, user: str = "leaky", app: str = "leaky-app", state: str = IIT,
        policy: str = "idle-in-transaction", outcome: str = "terminated", age: float = 42.0,
        action: str = "terminate", ago: float = 60.0, sweep: str | None = None,
        in_xact_before: float = 0.0, **extra: Any) -> dict[str, Any]:
    """A record as `once` writes it: measured from state_change (``age`` seconds in ``state``),
    its transaction begun ``in_xact_before`` seconds before that state began."""
    acted = NOW - timedelta(seconds=ago + i)
    changed = acted - timedelta(seconds=age)
    in_xact = state != "idle"
    return {"ts": iso(acted), "target": "main", "policy": policy, "action": action,
            "outcome": outcome, "pid": 1000 + i, "backend_start": iso(changed - timedelta(hours=1)),
            "usename": user, "datname": "app", "application_name": app,
            "client_addr": f"10.0.0.{i % 3 + 1}", "state": state, "state_change": iso(changed),
            "xact_start": iso(changed - timedelta(seconds=in_xact_before)) if in_xact else None,
            "query_start": iso(changed), "age_s": age,
            "sweep": sweep or f"s{i}", "dry_run": outcome.startswith("would_"), **extra}


def look(version: int = 180000, **kw: Any) -> Look:
    settings = {"max_connections": "100", "superuser_reserved_connections": "3",
                "reserved_connections": "3", "idle_in_transaction_session_timeout": "0",
                "statement_timeout": "0", "idle_session_timeout": "0", "work_mem": "4096",
                "server_version_num": str(version)}
    if version >= 170000:
        settings["transaction_timeout"] = "0"
    settings.update(kw.pop("settings", {}))
    base = Look("main", settings, {k: "ms" for k in settings if "timeout" in k}, {}, (), (),
                KEYWORDS, role="watchdog", use_reserved=True, peak_used=10)
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


@pytest.mark.parametrize(("role", "quoted"), [
    ('Leaky "App"', '"Leaky ""App"""'), ("all", '"all"'), ("current_user", '"current_user"'),
    ("user$1", '"user$1"'), ("leaky_2", "leaky_2"),
])
def test_role_names_are_quoted_in_the_sql(role: str, quoted: str) -> None:
    found = run([rec(i, user=role) for i in range(10)])
    [iit] = [f for f in found if f.id == "idle_in_transaction_timeout"]
    assert iit.fix[0].startswith(f"ALTER ROLE {quoted} SET"), iit.fix


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
    # 'django-web' is a name its owner chose, not a library's default: every recipe is listed.
    assert any(x.startswith("  Django: ") and "CONN_HEALTH_CHECKS" in x for x in leak.fix)
    assert any(x.startswith("  HikariCP") for x in leak.fix)


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
    [r] = run([], look(settings={"reserved_connections": "0"}, use_reserved=False))
    assert r.fix == ("GRANT pg_use_reserved_connections TO watchdog;",
                     "ALTER SYSTEM SET reserved_connections = 3;  -- then restart")
    assert r.evidence == ("reserved_connections is 0 (not set); watchdog cannot use them (no"
                          " pg_use_reserved_connections): a reconnect to a full server fails",)
    [r] = run([], look(use_reserved=False))
    assert r.fix == ("GRANT pg_use_reserved_connections TO watchdog;",)
    [r] = run([], look(settings={"reserved_connections": "0"}, use_reserved=True))
    assert r.fix == ("ALTER SYSTEM SET reserved_connections = 3;  -- then restart",)
    # A superuser watchdog gets in through superuser_reserved_connections, as check says.
    assert run([], look(settings={"reserved_connections": "0"}, rolsuper=True)) == []
    assert run([], look(version=150000, settings={"reserved_connections": "0"})) == []
    [r] = run([], look(use_reserved=False, role="all"))
    assert r.fix == ('GRANT pg_use_reserved_connections TO "all";',)


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


# -- each session counted once (issue 24) ------------------------------------------------


def test_a_dry_run_and_the_real_kill_of_one_session_count_once() -> None:
    dry = [rec(i, outcome="would_terminate", age=40, ago=61, sweep="dry") for i in range(8)]
    real = [rec(i, age=41, sweep="real") for i in range(8)]
    [leak] = [f for f in run(dry + real) if f.id == "leak"]
    assert "8 kills" in leak.evidence[0] and "8 of the 8 kills" in leak.evidence[0], leak
    assert any("8 more records of the same sessions counted once" in e for e in leak.evidence)
    [iit] = [f for f in run(dry + real) if f.id == "idle_in_transaction_timeout"]
    assert "8 kills" in iit.evidence[0], iit
    # A dry run repeating its would_* record every sweep is still one session each.
    repeated = [rec(i, outcome="would_terminate", sweep=f"d{k}")
                for k in range(3) for i in range(6)]
    [leak] = [f for f in run(repeated) if f.id == "leak"]
    assert "6 kills" in leak.evidence[0], leak


def test_cancels_of_one_session_count_once_per_query() -> None:
    cancel = Policy("long-query", frozenset({"active"}), 300.0, action="cancel")

    def query(n: int, outcome: str) -> dict[str, Any]:
        r = rec(0, user="report", app="metabase", state="active", policy="long-query",
                action="cancel", outcome=outcome, age=400, ago=60 + 1000 * n)
        return r | {"backend_start": "2026-11-25T08:00:00.000Z"}  # one session, 6 queries

    records = [query(n, o) for n in range(6) for o in ("would_cancel", "cancelled")]
    [st] = [f for f in run(records, cfg=config(cancel), start=86400) if f.id == "statement_timeout"]
    assert "6 kills" in st.evidence[0], st


# -- timeouts only where they would have acted; transaction_timeout (issue 18) -------------

LONG_XACT = Policy("long-xact", frozenset({IIT, "active"}), 30.0, measured_from="xact_start")


def busy_transactions(n: int = 8, user: str = "leaky") -> list[dict[str, Any]]:
    """Kills by a policy measured from xact_start of sessions that kept sending small queries:
    42 s into their transactions, only 0.1 s idle when killed."""
    return [rec(i, user=user, policy="long-xact", age=0.1, in_xact_before=41.9, age_s=42.0)
            for i in range(n)]


@pytest.mark.parametrize("version", [150000, 160000, 170000, 180000])
def test_no_idle_in_transaction_timeout_where_the_sessions_never_idled_that_long(
    version: int,
) -> None:
    found = run(busy_transactions(), look(version), config(LONG_XACT))
    assert "idle_in_transaction_timeout" not in ids(found), found
    assert not any("idle_in_transaction_session_timeout" in x for f in found for x in f.fix)


def test_idle_in_transaction_timeout_still_advised_for_transactions_that_just_sat_idle() -> None:
    # Measured from xact_start too, but the transaction did nothing after its first statement.
    records = [rec(i, policy="long-xact", age=42, in_xact_before=0.002) for i in range(8)]
    found = run(records, cfg=config(LONG_XACT))
    [iit] = [f for f in found if f.id == "idle_in_transaction_timeout"]
    assert iit.fix[0] == "ALTER ROLE leaky SET idle_in_transaction_session_timeout = '30s';"
    assert "transaction_timeout" not in ids(found)


@pytest.mark.parametrize("version", [170000, 180000])
def test_transaction_timeout_on_17_and_later(version: int) -> None:
    found = run(busy_transactions(user="all"), look(version), config(LONG_XACT))
    [tt] = [f for f in found if f.id == "transaction_timeout"]
    assert tt.fix[0] == "ALTER ROLE \"all\" SET transaction_timeout = '30s';"
    assert "transaction age at kill: typical 42s" in tt.evidence[1], tt.evidence
    assert any("Prepared transactions" in x and "exempt" in x for x in tt.fix)
    assert any("never server-wide" in x for x in tt.fix)
    already = look(version, role_settings={("all", None): {"transaction_timeout": "1min"}})
    assert "transaction_timeout" not in ids(run(busy_transactions(user="all"), already,
                                                config(LONG_XACT)))


@pytest.mark.parametrize("version", [150000, 160000])
def test_before_17_a_policy_measured_from_xact_start_stands_in(version: int) -> None:
    role = 'app "x"\n- evil'
    found = run(busy_transactions(user=role), look(version), config(LONG_XACT))
    [tt] = [f for f in found if f.id == "transaction_timeout"]
    assert not any("ALTER ROLE" in x for x in tt.fix), tt.fix
    assert f"PostgreSQL {version // 10000} has no transaction_timeout" in tt.fix[0]
    snippet = "\n".join(x for x in tt.fix if x.startswith("  "))
    import yaml
    [policy] = yaml.safe_load(snippet)
    assert policy["users"] == [role] and policy["measured_from"] == "xact_start"
    assert policy["longer_than"] == "30s"
    assert any("long-xact already measures from xact_start" in x for x in tt.fix)


def test_short_transactions_idle_for_long_are_no_transaction_timeout_finding() -> None:
    found = run([rec(i, age=42) for i in range(8)])
    assert "transaction_timeout" not in ids(found)


# -- stale prepared transactions (issue 18) --------------------------------------------------


def prepared(gid: str, age: float) -> PreparedXact:
    return PreparedXact(gid, NOW - timedelta(seconds=age), "app", "orders db", "1234", 99, age)


def test_stale_prepared_transaction_with_the_statement_to_review() -> None:
    lk = look(prepared=(prepared("it's \\ odd", 7200), prepared("young", 60)))
    [sp] = run([], lk)
    assert sp.id == "stale_prepared" and sp.severity == "high"
    assert "  ROLLBACK PREPARED E'it''s \\\\ odd';" in sp.fix
    assert any('connected to database "orders db" as app' in x for x in sp.fix)
    assert "2h00m ago" in sp.evidence[0]
    cfg = replace(config(), alerts=replace(config().alerts, prepared_older_than=30.0))
    assert len(run([], lk, cfg)) == 2
