"""decide(explain=False), the sweeps' shorter path, against the oracle and the explained path.

The sweep path shares the policies that may claim a session per group of alike sessions and
compares each session's timestamp with a precomputed edge instead of computing its age; it
must give exactly the same actions (every field, ages to the last bit), over_limit and
next_due as the explained path, which test_decide_properties.py checks against its oracle.
Here the drawn cases add what that oracle leaves out: sessions behind a pooler (linked,
unlinked, unreadable pooler), lock waits with `blocking` policies, and thresholds that are
no whole number of microseconds, with sessions a microsecond either side of them.

PG_WATCHDOG_DECIDE_EXAMPLES raises the examples per property (e.g. 100000 while working on
decide.py).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_decide_properties import BIG, Case, Digits, cases, check_safety, expected
from test_decide_table import TARGET, config, policy, session, snapshot

from watchdog.core.decide import _WHO, _edge, decide
from watchdog.core.model import ClientUnknown, Decision, PoolerClient, PoolerLink, Session

EXAMPLES = int(os.environ.get("PG_WATCHDOG_DECIDE_EXAMPLES", "1500"))
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
# Thresholds whose microseconds round awkwardly, and the ones the policy file makes.
# 0.00021799999999999999 is a hair below 218 microseconds, yet times 1e6 rounds up to 218.
AWKWARD = (0.1 + 0.2, 1e-7, 2.5e-7, 0.0000015, 1234.5678901, 0.3, 599.9999995, 1 / 3,
           600.0, 300.0, 1.0, 0.001, 86400 * 2.0, 0.00021799999999999999, 0.0017439999999999999)
POOLERS = ("pgb1", "pgb2")
REAL_ADDRS = ("10.1.2.3", "192.0.2.9", "2001:db8::1", None)


def same(case: Case, explained: Decision, swept: Decision) -> None:
    assert swept.actions == explained.actions
    assert [a.age_s for a in swept.actions] == [a.age_s for a in explained.actions]
    assert swept.over_limit == explained.over_limit
    assert swept.next_due == explained.next_due
    assert swept.verdicts == ()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_the_sweep_path_agrees_with_the_oracle(case: Case) -> None:
    d = decide(case.snapshot, case.config, case.target, dry_run=case.dry_run, explain=False)
    check_safety(case, d)
    want = expected(case)
    limit = case.config.limits.max_per_sweep
    assert len(d.actions) == min(len(want.acting), limit)
    assert d.over_limit == len(want.acting) - len(d.actions)
    for a in d.actions:
        assert a.policy == want.acting[a.session.pid][0].name
    assert d.next_due == want.next_due
    same(case, decide(case.snapshot, case.config, case.target, case.dry_run), d)


def _link(d: Digits) -> PoolerLink:
    pooler = d.pick(POOLERS)
    if d.chance(4):
        return PoolerLink(pooler, None, d.pick(tuple(ClientUnknown)))
    if d.chance(3):
        return PoolerLink(pooler)  # unlinked: pooled
    client = PoolerClient(d.pick(REAL_ADDRS), 5432, "app", "appdb", "web", None)
    return PoolerLink(pooler, client)


def _with_the_world(case: Case, code: int) -> Case:
    """``case`` with poolers holding some backends, lock waits, blocking policies, pooled
    exclusions and awkward thresholds."""
    d = Digits(code)
    sessions = list(case.snapshot.sessions)
    pids = [s.pid for s in sessions]
    for i, s in enumerate(sessions):
        if pids and d.chance(4):
            behind = tuple(dict.fromkeys(d.pick(pids) for _ in range(1 + d.below(2))))
            start = None if d.chance(5) else NOW - timedelta(seconds=d.below(900) / 3)
            sessions[i] = s._replace(blocked_by=behind, wait_start=start)
    pooled = {pid: _link(d) for pid in pids if d.chance(3)}
    snap = replace(case.snapshot, sessions=tuple(sessions), pooled=pooled)
    policies = []
    for p in case.config.policies:
        if d.chance(3):
            p = replace(p, longer_than=d.pick(AWKWARD))
        if d.chance(4):
            p = replace(p, blocking=True,
                        blocking_longer_than=d.pick((None, 0.5, 30.0, 1 / 3, 299.0)))
        if d.chance(5):
            p = replace(p, exclude=replace(p.exclude, pooled=True, listeners=d.chance(2)))
        policies.append(p)
    exclude = replace(case.config.exclude, pooled=d.chance(2))
    if d.chance(5):
        exclude = replace(exclude, client_addrs=(*exclude.client_addrs,
                                                 ipaddress.ip_network("10.0.0.0/8")))
    config = replace(case.config, policies=tuple(policies), exclude=exclude)
    return Case(snap, config, case.target, case.dry_run)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases, BIG)
def test_the_sweep_path_agrees_with_the_explained_path_behind_poolers_and_locks(
    case: Case, code: int
) -> None:
    case = _with_the_world(case, code)
    explained = decide(case.snapshot, case.config, case.target, case.dry_run)
    swept = decide(case.snapshot, case.config, case.target, case.dry_run, explain=False)
    same(case, explained, swept)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.sampled_from(AWKWARD),
        st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False),
        st.integers(1, 10**7).map(lambda us: us / 10**6),
    ),
    st.integers(-3, 3),
    st.integers(0, 999_999),
)
def test_the_edge_splits_ages_exactly_where_total_seconds_does(
    longer_than: float, near: int, now_us: int
) -> None:
    now = NOW + timedelta(microseconds=now_us)
    edge = _edge(now, longer_than)
    assert edge is not None
    for us in {round(longer_than * 1e6) + near, int(longer_than * 1e6) + near, near}:
        since = now - timedelta(microseconds=us)
        assert ((now - since).total_seconds() <= longer_than) == (since >= edge), (us, edge)


def test_no_edge_where_none_can_be_computed() -> None:
    for longer_than in (float("inf"), float("nan"), -float("inf"), 1e300, 2e9, -2e9):
        assert _edge(NOW, longer_than) is None
    # Such thresholds are judged by each session's age, as the explained path does (the
    # policy file makes none of them; a hand-built Config can).
    sessions = (session(10, idle_for=1e9, backend_for=2e9), session(11, idle_for=5.0))
    for longer_than in (float("inf"), float("nan"), 1e300, 5e8, 2e9, 1e9 - 1e-6):
        cfg = config(policy(longer_than=longer_than))
        snap = snapshot(*sessions)
        same_decision = decide(snap, cfg, TARGET, explain=False)
        assert same_decision == replace(decide(snap, cfg, TARGET), verdicts=())


def test_a_listener_is_spared_while_its_application_s_other_sessions_are_not() -> None:
    # The cache of exclusions by application does not hold the query text: whether the last
    # statement was a LISTEN is part of its key, in either order and on both paths.
    listener = session(10, query="/* poll */ LISTEN jobs")
    worker = session(11, query="SELECT 1")
    for sessions in ((listener, worker), (worker, listener)):
        snap = snapshot(*sessions)
        for explain in (True, False):
            d = decide(snap, config(), TARGET, explain=explain)
            assert [a.session.pid for a in d.actions] == [11]


def test_the_groups_key_holds_the_session_s_identity_fields_and_no_timestamp() -> None:
    assert Session._fields[_WHO] == (
        "usename", "rolsuper", "datname", "application_name", "client_addr", "state"
    )
