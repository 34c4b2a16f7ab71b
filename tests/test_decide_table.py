"""Table-driven tests of the pure decision (watchdog.core.decide.decide): one row per rule.

No server here: sessions are built by hand, so every rule that spares or acts on a
session is pinned down exactly, including the edges (age equal to the threshold,
saturation equal to `when.connections_above`, unknown rolsuper).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from watchdog.config.policy import Config, Exclusions, Limits, Policy, Target
from watchdog.core.decide import decide
from watchdog.core.model import CLIENT_BACKEND, Decision, Session, Snapshot, Verdict

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
OWN_PID = 1
TARGET = "main"
IDLE_10M = 600.0

# The shipped global exclusions (policies/default.yaml).
DEFAULT_EXCLUDE = Exclusions(
    superusers=True, applications=("pg_dump*", "pg_basebackup", "psql"), listeners=True,
    member_of=("rds_superuser", "azure_pg_admin", "cloudsqlsuperuser"),
)


def ago(seconds: float | None) -> datetime | None:
    return None if seconds is None else NOW - timedelta(seconds=seconds)


def session(
    pid: int = 100,
    *,
    idle_for: float | None = 3600.0,
    state: str | None = "idle",
    backend_type: str = CLIENT_BACKEND,
    user: str | None = "app",
    rolsuper: bool | None = False,
    db: str | None = "appdb",
    app: str = "web",
    addr: str | None = "10.1.2.3",
    query: str | None = "SELECT 1",
    xact_for: float | None = None,
    query_for: float | None = None,
    backend_for: float | None = 86400.0,
    leader_pid: int | None = None,
    member_of: tuple[str, ...] = (),
) -> Session:
    """A session in ``state`` since ``idle_for`` seconds (state_change) before NOW."""
    return Session(
        pid=pid,
        backend_type=backend_type,
        backend_start=ago(backend_for),
        usename=user,
        rolsuper=rolsuper,
        datname=db,
        application_name=app,
        client_addr=addr,
        state=state,
        state_change=ago(idle_for),
        xact_start=ago(xact_for),
        query_start=ago(query_for if query_for is not None else idle_for),
        query=query,
        leader_pid=leader_pid,
        member_of=member_of,
    )


def snapshot(*sessions: Session, max_connections: int = 103, su_reserved: int = 3,
             reserved: int = 0) -> Snapshot:
    """A snapshot whose ordinary capacity is 100 slots by default (saturation = clients/100)."""
    own = session(OWN_PID, app="pg-watchdog", user="watchdog", query="SELECT ...")
    return Snapshot(
        now=NOW,
        own_pid=OWN_PID,
        server_version_num=180001,
        max_connections=max_connections,
        superuser_reserved=su_reserved,
        reserved=reserved,
        sessions=(own, *sessions),
    )


def policy(name: str = "idle", states: tuple[str, ...] = ("idle",),
           longer_than: float = IDLE_10M, **kw: Any) -> Policy:
    return Policy(name=name, states=frozenset(states), longer_than=longer_than, **kw)


def config(*policies: Policy, exclude: Exclusions = DEFAULT_EXCLUDE, dry_run: bool = False,
           max_per_sweep: int = 50, targets: tuple[str, ...] = (TARGET, "replica")) -> Config:
    return Config(
        source="test.yaml",
        targets=tuple(Target(t, f"postgresql://watchdog@{t}/postgres", None, 30.0)
                      for t in targets),
        policies=policies or (policy(),),
        exclude=exclude,
        dry_run=dry_run,
        limits=Limits(max_per_sweep=max_per_sweep),
    )


def verdict_of(decision: Decision, pid: int) -> Verdict:
    (v,) = [v for v in decision.verdicts if v.session.pid == pid]
    return v


def acted_pids(decision: Decision) -> list[int]:
    return [a.session.pid for a in decision.actions]


def assert_spared(decision: Decision, pid: int, reason: str) -> None:
    assert pid not in acted_pids(decision)
    v = verdict_of(decision, pid)
    assert not v.acting
    assert v.policy is None
    assert reason in v.reason, v.reason


def assert_acted(decision: Decision, pid: int, by: str = "idle") -> None:
    (a,) = [a for a in decision.actions if a.session.pid == pid]
    assert a.policy == by
    v = verdict_of(decision, pid)
    assert v.acting and v.policy == by


# -- the baseline ------------------------------------------------------------


def test_ordinary_idle_session_past_threshold_is_terminated() -> None:
    d = decide(snapshot(session(100, idle_for=601)), config(), TARGET)
    assert_acted(d, 100)
    (a,) = d.actions
    assert (a.target, a.action, a.dry_run, a.measured_from) == (TARGET, "terminate", False,
                                                               "state_change")
    assert a.age_s == pytest.approx(601)
    assert d.over_limit == 0


def test_the_watchdogs_own_connection_is_spared_even_with_nothing_excluded() -> None:
    own = session(OWN_PID, app="psql", user="watchdog", idle_for=99999)
    snap = replace(snapshot(), sessions=(own,))
    d = decide(snap, config(exclude=Exclusions()), TARGET)
    assert_spared(d, OWN_PID, "the watchdog's own connection")


# -- global exclusions -------------------------------------------------------

SPARED_BY_EXCLUDE = [
    # (id, session overrides, exclusions, reason fragment)
    ("superuser_idle_past_threshold_is_spared", {"rolsuper": True, "user": "postgres"},
     DEFAULT_EXCLUDE, "superuser"),
    ("unknown_rolsuper_none_is_spared_as_superuser", {"rolsuper": None, "user": None},
     DEFAULT_EXCLUDE, "superuser"),
    ("superuser_named_like_an_app_role_is_spared_by_rolsuper_not_name",
     {"rolsuper": True, "user": "app"}, DEFAULT_EXCLUDE, "superuser"),
    ("excluded_user_exact_is_spared", {"user": "etl"},
     Exclusions(users=("etl",)), "excluded user 'etl'"),
    ("excluded_user_glob_is_spared", {"user": "svc_reporting"},
     Exclusions(users=("svc_*",)), "excluded user"),
    ("excluded_application_glob_is_spared", {"app": "pg_dumpall"},
     DEFAULT_EXCLUDE, "excluded application 'pg_dumpall'"),
    ("excluded_application_exact_is_spared", {"app": "psql"},
     DEFAULT_EXCLUDE, "excluded application 'psql'"),
    ("excluded_application_charclass_glob_is_spared", {"app": "worker-7"},
     Exclusions(applications=("worker-[0-9]",)), "excluded application"),
    ("excluded_database_is_spared", {"db": "billing"},
     Exclusions(databases=("billing",)), "excluded database 'billing'"),
    ("excluded_database_glob_is_spared", {"db": "tenant_42"},
     Exclusions(databases=("tenant_*",)), "excluded database"),
    ("excluded_ipv4_cidr_is_spared", {"addr": "10.20.30.40"},
     Exclusions(client_addrs=(ipaddress.ip_network("10.0.0.0/8"),)), "excluded client address"),
    ("excluded_ipv4_host_cidr_is_spared", {"addr": "192.0.2.7"},
     Exclusions(client_addrs=(ipaddress.ip_network("192.0.2.7/32"),)),
     "excluded client address"),
    ("excluded_ipv6_cidr_is_spared", {"addr": "2001:db8::42"},
     Exclusions(client_addrs=(ipaddress.ip_network("2001:db8::/32"),)),
     "excluded client address"),
    ("excluded_ipv6_loopback_is_spared", {"addr": "::1"},
     Exclusions(client_addrs=(ipaddress.ip_network("::1/128"),)), "excluded client address"),
    ("member_of_rds_superuser_is_spared_by_the_shipped_exclusions",
     {"user": "dba", "member_of": ("rds_superuser",)}, DEFAULT_EXCLUDE,
     "member of rds_superuser"),
    ("member_of_azure_pg_admin_is_spared_by_the_shipped_exclusions",
     {"user": "azadmin", "member_of": ("azure_pg_admin",)}, DEFAULT_EXCLUDE,
     "member of azure_pg_admin"),
    ("member_of_names_the_first_listed_role_the_session_is_in",
     {"member_of": ("ops", "rds_superuser")}, Exclusions(member_of=("rds_superuser", "ops")),
     "member of rds_superuser"),
    ("listener_is_spared", {"query": "LISTEN jobs"}, DEFAULT_EXCLUDE, "listener"),
    ("listener_lowercase_is_spared", {"query": "listen jobs"}, DEFAULT_EXCLUDE, "listener"),
    ("listener_with_leading_whitespace_is_spared", {"query": " \n\t Listen \"Jobs\""},
     DEFAULT_EXCLUDE, "listener"),
    ("listener_with_semicolon_is_spared", {"query": "LISTEN jobs;"}, DEFAULT_EXCLUDE,
     "listener"),
    ("listener_after_a_leading_comment_is_spared", {"query": "/* app:web */ LISTEN jobs"},
     DEFAULT_EXCLUDE, "listener"),
    ("listener_after_a_line_comment_is_spared", {"query": "-- wait for jobs\nLISTEN jobs"},
     DEFAULT_EXCLUDE, "listener"),
]


@pytest.mark.parametrize(("overrides", "exclude", "reason"),
                         [row[1:] for row in SPARED_BY_EXCLUDE],
                         ids=[row[0] for row in SPARED_BY_EXCLUDE])
def test_globally_excluded_session_is_spared(overrides: dict[str, Any], exclude: Exclusions,
                                             reason: str) -> None:
    d = decide(snapshot(session(100, **overrides)), config(exclude=exclude), TARGET)
    assert_spared(d, 100, reason)


NOT_EXCLUDED = [
    ("superuser_is_terminated_when_exclude_superusers_is_false", {"rolsuper": True},
     Exclusions(superusers=False)),
    ("unknown_rolsuper_is_terminated_when_exclude_superusers_is_false", {"rolsuper": None},
     Exclusions(superusers=False)),
    ("application_glob_is_case_sensitive", {"app": "PG_DUMP"}, DEFAULT_EXCLUDE),
    ("application_glob_matches_the_whole_name", {"app": "mypsql"}, DEFAULT_EXCLUDE),
    ("ipv4_address_outside_the_cidr_is_terminated", {"addr": "11.0.0.1"},
     Exclusions(client_addrs=(ipaddress.ip_network("10.0.0.0/8"),))),
    ("ipv6_address_is_not_matched_by_an_ipv4_cidr", {"addr": "2001:db8::1"},
     Exclusions(client_addrs=(ipaddress.ip_network("0.0.0.0/0"),))),
    ("ipv4_address_is_not_matched_by_an_ipv6_cidr", {"addr": "10.0.0.1"},
     Exclusions(client_addrs=(ipaddress.ip_network("::/0"),))),
    ("unix_socket_session_is_not_matched_by_a_cidr", {"addr": None},
     Exclusions(client_addrs=(ipaddress.ip_network("0.0.0.0/0"),
                              ipaddress.ip_network("::/0")))),
    ("null_user_is_not_matched_by_a_user_glob", {"user": None}, Exclusions(users=("*",))),
    ("null_database_is_not_matched_by_a_database_glob", {"db": None},
     Exclusions(databases=("*",))),
    ("listener_is_terminated_when_exclude_listeners_is_false", {"query": "LISTEN jobs"},
     Exclusions(listeners=False)),
    ("unlisten_is_not_a_listener", {"query": "UNLISTEN *"}, DEFAULT_EXCLUDE),
    ("listen_inside_a_string_is_not_a_listener", {"query": "SELECT 'LISTEN x'"},
     DEFAULT_EXCLUDE),
    ("identifier_starting_with_listen_is_not_a_listener", {"query": "listener_poll()"},
     DEFAULT_EXCLUDE),
    ("null_query_is_not_a_listener", {"query": None}, DEFAULT_EXCLUDE),
    ("member_of_another_role_is_terminated", {"member_of": ("ops",)}, DEFAULT_EXCLUDE),
    ("member_of_is_an_exact_role_not_a_glob", {"member_of": ("rds_superuser",)},
     Exclusions(member_of=("rds_*",))),
]


@pytest.mark.parametrize(("overrides", "exclude"), [row[1:] for row in NOT_EXCLUDED],
                         ids=[row[0] for row in NOT_EXCLUDED])
def test_session_not_covered_by_an_exclusion_is_terminated(overrides: dict[str, Any],
                                                          exclude: Exclusions) -> None:
    d = decide(snapshot(session(100, **overrides)), config(exclude=exclude), TARGET)
    assert_acted(d, 100)


# -- rules no configuration overrides ----------------------------------------

NEVER_TOUCHED = [
    ("autovacuum_worker", {"backend_type": "autovacuum worker", "user": None}, "autovacuum"),
    ("autovacuum_launcher", {"backend_type": "autovacuum launcher", "user": None},
     "not a client backend"),
    ("walsender", {"backend_type": "walsender", "app": "walreceiver"}, "walsender"),
    ("background_worker", {"backend_type": "pg_cron scheduler"}, "not a client backend"),
    ("logical_replication_worker", {"backend_type": "logical replication worker"},
     "not a client backend"),
    ("parallel_worker_with_leader_pid", {"backend_type": "parallel worker", "leader_pid": 100},
     "not a client backend"),
    ("io_worker", {"backend_type": "io worker", "user": None, "state": None}, "io worker"),
    ("checkpointer", {"backend_type": "checkpointer", "user": None, "state": None},
     "not a client backend"),
    ("hidden_backend_type_empty", {"backend_type": ""}, "not a client backend"),
    ("client_backend_with_a_leader_pid_is_a_parallel_worker", {"leader_pid": 99},
     "parallel worker"),
    ("another_pg_watchdog_instance", {"app": "pg-watchdog", "user": "watchdog"},
     "another pg-watchdog instance (same role)"),
    ("state_not_visible_without_pg_monitor", {"state": None}, "details not visible"),
    ("backend_start_not_visible_without_pg_monitor", {"backend_for": None},
     "details not visible"),
]


@pytest.mark.parametrize(("overrides", "reason"), [row[1:] for row in NEVER_TOUCHED],
                         ids=[row[0] for row in NEVER_TOUCHED])
def test_non_client_or_unsafe_backend_is_never_touched(overrides: dict[str, Any],
                                                       reason: str) -> None:
    # Nothing excluded, every state targeted, a tiny threshold, even a full server.
    every_state = ("idle", "idle in transaction", "idle in transaction (aborted)", "active",
                   "fastpath function call")
    cfg = config(policy("any", every_state, 0.001), exclude=Exclusions())
    d = decide(snapshot(session(100, **overrides)), cfg, TARGET)
    assert_spared(d, 100, reason)


IMPOSTORS = [
    # (case, the session's role, the watchdog's own role or None when its row is missing)
    ("another_role_calling_itself_pg_watchdog", "app", "watchdog"),
    ("no_role_visible", None, "watchdog"),
    ("own_row_missing_from_the_look", "watchdog", None),
    ("case_differs", "Watchdog", "watchdog"),
]


@pytest.mark.parametrize(("user", "own_role"), [row[1:] for row in IMPOSTORS],
                         ids=[row[0] for row in IMPOSTORS])
def test_application_name_alone_buys_no_immunity(user: str | None, own_role: str | None) -> None:
    impostor = session(100, app="pg-watchdog", user=user)
    snap = snapshot(impostor)
    if own_role is None:
        snap = replace(snap, sessions=(impostor,))
    else:
        assert snap.own_role == own_role
    assert_acted(decide(snap, config(), TARGET), 100)


def test_another_instance_is_the_watchdog_role_with_its_application_name() -> None:
    d = decide(snapshot(session(100, app="pg-watchdog", user="watchdog"),
                        session(101, app="web", user="watchdog")), config(), TARGET)
    assert_spared(d, 100, "another pg-watchdog instance (same role)")
    assert_acted(d, 101)  # the watchdog's role under another name is judged like any session


# -- thresholds ----------------------------------------------------------------


def test_session_exactly_at_threshold_is_not_acted_on() -> None:
    d = decide(snapshot(session(100, idle_for=IDLE_10M)), config(), TARGET)
    assert d.actions == ()
    v = verdict_of(d, 100)
    assert (v.policy, v.acting, v.due_in) == ("idle", False, 0.0)
    assert "not yet due" in v.reason


def test_session_a_microsecond_past_threshold_is_acted_on() -> None:
    d = decide(snapshot(session(100, idle_for=IDLE_10M + 1e-6)), config(), TARGET)
    assert_acted(d, 100)


def test_session_below_threshold_reports_when_it_is_due() -> None:
    d = decide(snapshot(session(100, idle_for=IDLE_10M - 42.5)), config(), TARGET)
    assert d.actions == ()
    v = verdict_of(d, 100)
    assert (v.policy, v.acting) == ("idle", False)
    assert v.due_in == pytest.approx(42.5)
    assert d.next_due == pytest.approx(42.5)


def test_state_change_in_the_future_counts_as_not_yet_due() -> None:
    # now() is the statement's start; a session may change state a moment later.
    d = decide(snapshot(session(100, idle_for=-0.5)), config(), TARGET)
    assert d.actions == ()
    assert verdict_of(d, 100).due_in == pytest.approx(IDLE_10M + 0.5)


def test_next_due_is_the_smallest_remaining_time_over_all_sessions_and_policies() -> None:
    cfg = config(policy("idle", ("idle",), 600.0),
                 policy("iit", ("idle in transaction",), 300.0))
    snap = snapshot(
        session(100, idle_for=500),  # idle due in 100
        session(101, state="idle in transaction", idle_for=290, xact_for=290),  # due in 10
        session(102, idle_for=700),  # acted now: not counted
        session(103, idle_for=599, rolsuper=True),  # spared: not counted
    )
    d = decide(snap, cfg, TARGET)
    assert acted_pids(d) == [102]
    assert d.next_due == pytest.approx(10.0)


def test_next_due_is_none_when_nothing_is_pending() -> None:
    d = decide(snapshot(session(100, idle_for=700), session(101, state="active")), config(),
               TARGET)
    assert d.next_due is None


# -- states, policy filters and policy exclusions ------------------------------


@pytest.mark.parametrize("state", ["active", "idle in transaction", "fastpath function call",
                                   "disabled", "starting"])
def test_session_in_a_state_no_policy_names_is_spared(state: str) -> None:
    d = decide(snapshot(session(100, state=state)), config(), TARGET)
    assert_spared(d, 100, f"no policy for state {state!r}")


def test_policy_with_several_states_acts_on_each() -> None:
    cfg = config(policy("iit", ("idle in transaction", "idle in transaction (aborted)"), 300.0))
    snap = snapshot(
        session(100, state="idle in transaction", idle_for=301, xact_for=400),
        session(101, state="idle in transaction (aborted)", idle_for=301, xact_for=400),
        session(102, state="idle", idle_for=9999),
    )
    d = decide(snap, cfg, TARGET)
    assert sorted(acted_pids(d)) == [100, 101]


POLICY_FILTERS = [
    # (id, policy keywords, session overrides, acted?)
    ("policy_users_match_acts", {"users": ("app",)}, {}, True),
    ("policy_users_glob_match_acts", {"users": ("ap*",)}, {}, True),
    ("policy_users_mismatch_spares", {"users": ("etl",)}, {}, False),
    ("policy_users_spare_a_null_user", {"users": ("*",)}, {"user": None}, False),
    ("policy_applications_match_acts", {"applications": ("web", "api")}, {}, True),
    ("policy_applications_mismatch_spares", {"applications": ("api",)}, {}, False),
    ("policy_databases_match_acts", {"databases": ("app*",)}, {}, True),
    ("policy_databases_mismatch_spares", {"databases": ("billing",)}, {}, False),
    ("policy_client_addrs_ipv4_match_acts",
     {"client_addrs": (ipaddress.ip_network("10.1.0.0/16"),)}, {}, True),
    ("policy_client_addrs_ipv4_mismatch_spares",
     {"client_addrs": (ipaddress.ip_network("10.2.0.0/16"),)}, {}, False),
    ("policy_client_addrs_ipv6_match_acts",
     {"client_addrs": (ipaddress.ip_network("fd00::/8"),)}, {"addr": "fd12::3"}, True),
    ("policy_client_addrs_spare_a_unix_socket_session",
     {"client_addrs": (ipaddress.ip_network("0.0.0.0/0"),)}, {"addr": None}, False),
    ("policy_all_filters_must_match", {"users": ("app",), "databases": ("other",)}, {}, False),
    ("policy_exclude_user_spares", {"exclude": Exclusions(users=("app",))}, {}, False),
    ("policy_exclude_application_spares", {"exclude": Exclusions(applications=("w*",))}, {},
     False),
    ("policy_exclude_database_spares", {"exclude": Exclusions(databases=("appdb",))}, {}, False),
    ("policy_exclude_cidr_spares",
     {"exclude": Exclusions(client_addrs=(ipaddress.ip_network("10.0.0.0/8"),))}, {}, False),
    ("policy_member_of_match_acts", {"member_of": ("ops",)}, {"member_of": ("ops",)}, True),
    ("policy_member_of_any_listed_role_acts", {"member_of": ("dev", "ops")},
     {"member_of": ("ops",)}, True),
    ("policy_member_of_mismatch_spares", {"member_of": ("ops",)}, {}, False),
    ("policy_exclude_member_of_spares", {"exclude": Exclusions(member_of=("ops",))},
     {"member_of": ("ops",)}, False),
    ("policy_exclude_superusers_spares_even_when_global_does_not",
     {"exclude": Exclusions(superusers=True)}, {"rolsuper": True}, False),
    ("policy_exclude_listeners_spares_even_when_global_does_not",
     {"exclude": Exclusions(listeners=True)}, {"query": "LISTEN q"}, False),
]


@pytest.mark.parametrize(("kw", "overrides", "acted"), [row[1:] for row in POLICY_FILTERS],
                         ids=[row[0] for row in POLICY_FILTERS])
def test_policy_filters_and_exclusions(kw: dict[str, Any], overrides: dict[str, Any],
                                       acted: bool) -> None:
    cfg = config(policy(**kw), exclude=Exclusions())
    d = decide(snapshot(session(100, **overrides)), cfg, TARGET)
    if acted:
        assert_acted(d, 100)
    else:
        assert_spared(d, 100, "idle: ")


def test_policy_exclusion_lets_a_later_policy_act() -> None:
    cfg = config(policy("gentle", exclude=Exclusions(applications=("web",))),
                 policy("strict"))
    d = decide(snapshot(session(100)), cfg, TARGET)
    assert_acted(d, 100, by="strict")


def test_member_of_policy_filter_explains_why_a_non_member_is_left_alone() -> None:
    cfg = config(policy("ops-only", member_of=("ops",)), exclude=Exclusions())
    d = decide(snapshot(session(100)), cfg, TARGET)
    assert_spared(d, 100, "ops-only: role not a member of the policy's member_of")


def test_sessions_alike_but_for_membership_get_their_own_answers() -> None:
    # decide() caches one answer per application-alike group: membership is part of the key.
    same = {"user": "dba", "app": "dbeaver", "db": "appdb", "addr": "10.1.2.3"}
    snap = snapshot(session(100, **same), session(101, **same, member_of=("rds_superuser",)),
                    session(102, **same))
    d = decide(snap, config(), TARGET)
    assert sorted(acted_pids(d)) == [100, 102]
    assert_spared(d, 101, "member of rds_superuser")
    pol = config(policy("ops-only", member_of=("ops",)), exclude=Exclusions())
    snap = snapshot(session(100, **same, member_of=("ops",)), session(101, **same),
                    session(102, **same, member_of=("ops",)))
    d = decide(snap, pol, TARGET)
    assert sorted(acted_pids(d)) == [100, 102]
    assert_spared(d, 101, "role not a member")


# -- policy order --------------------------------------------------------------


def test_first_matching_policy_wins() -> None:
    cfg = config(policy("first", longer_than=60.0, action="terminate"),
                 policy("second", longer_than=30.0))
    d = decide(snapshot(session(100, idle_for=120)), cfg, TARGET)
    assert_acted(d, 100, by="first")
    assert len(d.actions) == 1


def test_first_matching_policy_claims_the_session_before_it_is_due() -> None:
    # As in pg_hba.conf, the first policy whose state and filters match decides: a gentler
    # specific rule first is a grace period that a stricter generic rule after it respects.
    cfg = config(policy("gentle", longer_than=3600.0, applications=("web",)),
                 policy("strict", longer_than=600.0))
    d = decide(snapshot(session(100, idle_for=900)), cfg, TARGET)
    assert d.actions == ()
    v = verdict_of(d, 100)
    assert (v.policy, v.acting, v.due_in) == ("gentle", False, pytest.approx(2700.0))
    assert d.next_due == pytest.approx(2700.0)
    # A session the gentle rule does not match still falls to the strict one.
    other = session(101, idle_for=900, app="batch")
    assert_acted(decide(snapshot(other), cfg, TARGET), 101, by="strict")


def test_inactive_escalation_falls_through_and_explains_why() -> None:
    cfg = config(policy("when-full", longer_than=60.0, connections_above=0.9),
                 policy("idle", longer_than=600.0))
    d = decide(snapshot(session(100, idle_for=300)), cfg, TARGET)
    v = verdict_of(d, 100)
    assert (v.policy, v.acting, v.due_in) == ("idle", False, pytest.approx(300.0))
    assert "when-full: server at" in v.reason


def test_not_yet_due_verdict_names_the_first_pending_policy() -> None:
    cfg = config(policy("a", longer_than=1000.0), policy("b", longer_than=2000.0))
    d = decide(snapshot(session(100, idle_for=500)), cfg, TARGET)
    v = verdict_of(d, 100)
    assert (v.policy, v.acting, v.due_in) == ("a", False, pytest.approx(500.0))
    assert d.next_due == pytest.approx(500.0)


def test_policy_restricted_to_other_targets_does_not_act_here() -> None:
    cfg = config(policy("replica-only", targets=("replica",)))
    snap = snapshot(session(100))
    assert decide(snap, cfg, TARGET).actions == ()
    assert_spared(decide(snap, cfg, TARGET), 100, "no policy for state 'idle'")
    assert_acted(decide(snap, cfg, "replica"), 100, by="replica-only")


def test_policy_listing_this_target_acts_here() -> None:
    cfg = config(policy("both", targets=("replica", TARGET)))
    assert_acted(decide(snapshot(session(100)), cfg, TARGET), 100, by="both")


# -- when.connections_above (saturation over capacity 100) -----------------------


def _clients(n: int, first_pid: int = 1000) -> list[Session]:
    # Active sessions fill slots without matching any idle policy.
    return [session(first_pid + i, state="active", idle_for=1) for i in range(n)]


@pytest.mark.parametrize(
    ("clients", "acted"),
    [(88, True), (87, False), (86, False)],
    ids=["above_threshold_acts", "equal_to_threshold_does_not_act", "below_threshold_waits"],
)
def test_when_connections_above(clients: int, acted: bool) -> None:
    # used = the watchdog + the idle session + `clients` actives: 90, 89 or 88 of 100 slots;
    # the policy acts while used / capacity > 89%.
    cfg = config(policy("when-full", connections_above=0.89))
    snap = snapshot(session(100), *_clients(clients))
    assert snap.capacity == 100
    d = decide(snap, cfg, TARGET)
    if acted:
        assert_acted(d, 100, by="when-full")
    else:
        assert_spared(d, 100, "when-full: server at")
        assert "acts above 89%" in verdict_of(d, 100).reason


def test_when_connections_above_uses_capacity_net_of_reserved_slots() -> None:
    # 20 slots minus 3 superuser-reserved minus 2 reserved = 15 ordinary; 14 used > 90%.
    snap = snapshot(session(100), *_clients(12), max_connections=20, su_reserved=3, reserved=2)
    assert (snap.capacity, snap.used) == (15, 14)
    d = decide(snap, config(policy("when-full", connections_above=0.9)), TARGET)
    assert_acted(d, 100, by="when-full")


def test_escalation_policy_first_then_normal_policy() -> None:
    cfg = config(policy("idle-when-full", longer_than=60.0, connections_above=0.9),
                 policy("idle", longer_than=600.0))
    quiet = snapshot(session(100, idle_for=120), session(101, idle_for=700))
    d = decide(quiet, cfg, TARGET)
    assert acted_pids(d) == [101]
    assert verdict_of(d, 100).policy == "idle"  # not yet due under the normal policy
    full = snapshot(session(100, idle_for=120), session(101, idle_for=700), *_clients(95))
    d = decide(full, cfg, TARGET)
    assert {a.session.pid: a.policy for a in d.actions} == {100: "idle-when-full",
                                                            101: "idle-when-full"}


# -- measured_from ---------------------------------------------------------------

MEASURED_FROM = [
    # (id, measured_from, session overrides, expected age or None when the column is NULL)
    ("state_change_is_the_default", "state_change",
     {"idle_for": 700, "xact_for": 5000, "query_for": 900}, 700.0),
    ("xact_start", "xact_start",
     {"state": "idle in transaction", "idle_for": 10, "xact_for": 700}, 700.0),
    ("query_start", "query_start",
     {"state": "active", "idle_for": 10, "query_for": 700}, 700.0),
    ("backend_start", "backend_start", {"idle_for": 10, "backend_for": 700}, 700.0),
    ("null_xact_start_never_matches", "xact_start",
     {"state": "idle in transaction", "idle_for": 9999, "xact_for": None}, None),
]


@pytest.mark.parametrize(("measured_from", "overrides", "age"),
                         [row[1:] for row in MEASURED_FROM],
                         ids=[row[0] for row in MEASURED_FROM])
def test_measured_from(measured_from: str, overrides: dict[str, Any], age: float | None) -> None:
    state = overrides.get("state", "idle")
    cfg = config(policy("p", (state,), 600.0, measured_from=measured_from))
    d = decide(snapshot(session(100, **overrides)), cfg, TARGET)
    if age is None:
        assert_spared(d, 100, f"p: no {measured_from}")
        return
    (a,) = d.actions
    assert (a.measured_from, a.age_s) == (measured_from, pytest.approx(age))


def test_measured_from_below_threshold_is_not_due_even_if_state_change_is_old() -> None:
    cfg = config(policy("p", ("idle",), 600.0, measured_from="backend_start"))
    d = decide(snapshot(session(100, idle_for=9999, backend_for=9999 - 1)), cfg, TARGET)
    assert_acted(d, 100, by="p")
    d = decide(snapshot(session(100, idle_for=9999, backend_for=500)), cfg, TARGET)
    assert d.actions == () and verdict_of(d, 100).due_in == pytest.approx(100.0)


# -- dry run -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "top", "per_policy", "dry"),
    [
        (False, False, False, False),
        (True, False, False, True),
        (False, True, False, True),
        (False, False, True, True),
        (True, True, True, True),
    ],
    ids=["live", "dry_run_argument", "dry_run_top_level", "dry_run_per_policy", "all_dry"],
)
def test_dry_run_sources(arg: bool, top: bool, per_policy: bool, dry: bool) -> None:
    cfg = config(policy(dry_run=per_policy), dry_run=top)
    d = decide(snapshot(session(100), session(101)), cfg, TARGET, dry_run=arg)
    assert len(d.actions) == 2
    assert all(a.dry_run is dry for a in d.actions)


def test_per_policy_dry_run_only_affects_that_policy() -> None:
    cfg = config(policy("trial", ("idle",), dry_run=True),
                 policy("iit", ("idle in transaction",), 300.0))
    snap = snapshot(session(100), session(101, state="idle in transaction", xact_for=9999))
    d = decide(snap, cfg, TARGET)
    assert {a.policy: a.dry_run for a in d.actions} == {"trial": True, "iit": False}


# -- limits.max_per_sweep ----------------------------------------------------------


def test_max_per_sweep_keeps_the_oldest_and_counts_the_rest() -> None:
    ages = [700, 5000, 601, 3000, 900, 1200]
    snap = snapshot(*(session(100 + i, idle_for=age) for i, age in enumerate(ages)))
    d = decide(snap, config(max_per_sweep=3), TARGET)
    assert [a.age_s for a in d.actions] == [5000, 3000, 1200]
    assert d.over_limit == 3
    # Every session still has its acting verdict, the dropped ones included.
    assert sum(v.acting for v in d.verdicts) == 6


def test_max_per_sweep_not_reached_leaves_over_limit_zero() -> None:
    snap = snapshot(*(session(100 + i, idle_for=700 + i) for i in range(3)))
    d = decide(snap, config(max_per_sweep=3), TARGET)
    assert len(d.actions) == 3 and d.over_limit == 0


def test_actions_are_ordered_oldest_first_then_by_pid() -> None:
    snap = snapshot(session(300, idle_for=700), session(200, idle_for=900),
                    session(100, idle_for=700))
    d = decide(snap, config(), TARGET)
    assert acted_pids(d) == [200, 100, 300]


def test_max_per_sweep_counts_actions_across_policies() -> None:
    cfg = config(policy("idle"), policy("iit", ("idle in transaction",), 300.0),
                 max_per_sweep=2)
    snap = snapshot(session(100, idle_for=700),
                    session(101, state="idle in transaction", idle_for=10000, xact_for=10000),
                    session(102, idle_for=800))
    d = decide(snap, cfg, TARGET)
    assert acted_pids(d) == [101, 102]
    assert d.over_limit == 1


# -- verdicts (status --explain) -------------------------------------------------


def test_every_session_gets_exactly_one_verdict_in_snapshot_order() -> None:
    snap = snapshot(session(100), session(101, rolsuper=True),
                    session(102, backend_type="walsender"), session(103, idle_for=5))
    d = decide(snap, config(), TARGET)
    assert [v.session.pid for v in d.verdicts] == [OWN_PID, 100, 101, 102, 103]


def test_verdict_reasons_for_explain() -> None:
    cfg = config(
        policy("idle", users=("app",)),
        policy("busy", ("active",), 60.0, connections_above=0.95),
        exclude=replace(DEFAULT_EXCLUDE, client_addrs=(ipaddress.ip_network("192.0.2.0/24"),)),
    )
    snap = snapshot(
        session(100, idle_for=700),
        session(101, idle_for=100),
        session(102, user="etl"),
        session(103, state="active", idle_for=999),
        session(104, state="idle in transaction"),
        session(105, addr="192.0.2.9"),
    )
    d = decide(snap, cfg, TARGET)
    reasons = {v.session.pid: v.reason for v in d.verdicts}
    assert reasons[OWN_PID] == "the watchdog's own connection"
    assert reasons[100] == "idle: idle past 600s"
    assert reasons[101] == "idle: not yet due"
    assert reasons[102] == "idle: user not in the policy's users"
    assert reasons[103] == "busy: server at 7%, acts above 95%"
    assert reasons[104] == "no policy for state 'idle in transaction'"
    assert reasons[105] == "excluded client address 192.0.2.9"
    assert verdict_of(d, 100).due_in == 0.0
    assert verdict_of(d, 101).due_in == pytest.approx(500.0)


def test_verdict_lists_every_policy_that_declined() -> None:
    cfg = config(policy("a", users=("x",)), policy("b", databases=("y",)))
    d = decide(snapshot(session(100)), cfg, TARGET)
    assert verdict_of(d, 100).reason == (
        "a: user not in the policy's users; b: database not in the policy's databases"
    )


def test_empty_snapshot_decides_nothing() -> None:
    snap = replace(snapshot(), sessions=())
    d = decide(snap, config(), TARGET)
    assert d == Decision((), (), 0, None)
