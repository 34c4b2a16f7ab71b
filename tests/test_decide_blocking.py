"""Table tests of the blocking keys and of the lock-wait graph (no server: sessions by hand).

The real-server shapes (two rows, one queue) are in test_blocking_sweep.py.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from test_decide_table import NOW, TARGET, config, policy, session, snapshot, verdict_of

from watchdog.audit.log import make_record
from watchdog.config.policy import Policy
from watchdog.core.blockers import describe
from watchdog.core.decide import decide
from watchdog.core.model import Blocking, Outcome, Session, blocking_map

IIT = ("idle in transaction",)


def holder(pid: int, idle_for: float = 60.0) -> Session:
    return session(pid, state="idle in transaction", idle_for=idle_for, xact_for=idle_for)


def waiter(pid: int, behind: tuple[int, ...], waited: float | None) -> Session:
    s = session(pid, state="active", idle_for=waited or 0.0, query="UPDATE t SET v = v")
    start = None if waited is None else NOW - timedelta(seconds=waited)
    return s._replace(blocked_by=behind, wait_start=start)


GRAPHS = [
    # (id, sessions, expected {pid: (count, longest)})
    ("nobody_waits", [holder(10)], {}),
    ("two_rows_one_waiter_each", [holder(10), waiter(20, (10,), 3), waiter(21, (10,), 5)],
     {10: (2, 5.0)}),
    # W2 queued behind W1 on the same row: pg_blocking_pids(W2) = {W1}.
    ("one_row_two_waiters_queued", [holder(10), waiter(20, (10,), 7), waiter(21, (20,), 4)],
     {10: (2, 7.0), 20: (1, 4.0)}),
    ("wait_start_not_yet_set_counts_as_zero", [holder(10), waiter(20, (10,), None)],
     {10: (1, 0.0)}),
    ("diamond_counts_a_waiter_once", [holder(10), waiter(20, (10,), 1), waiter(21, (10,), 2),
                                      waiter(22, (20, 21), 9)],
     {10: (3, 9.0), 20: (1, 9.0), 21: (1, 9.0)}),
    ("cycle_terminates", [waiter(20, (21,), 2), waiter(21, (20,), 3)],
     {20: (1, 3.0), 21: (1, 2.0)}),
    ("empty_blocked_by_is_no_edge", [holder(10), waiter(20, (), 5)], {}),
]


@pytest.mark.parametrize(("sessions", "want"), [g[1:] for g in GRAPHS],
                         ids=[g[0] for g in GRAPHS])
def test_blocking_map_follows_the_queue_to_the_holder(
    sessions: list[Session], want: dict[int, tuple[int, float]]
) -> None:
    got = blocking_map(sessions, NOW)
    assert {pid: (b.sessions, b.longest_wait_s) for pid, b in got.items()} == want


def test_describe() -> None:
    assert describe(None) == "blocks nobody"
    assert describe(Blocking(3, 12.44)) == "blocks 3 sessions (longest 12.4s)"
    assert describe(Blocking(1, 0.0)) == "blocks 1 session (longest 0.0s)"


BLOCKER = policy("blocker", IIT, 1.0, blocking=True)
BLOCKER_10S = policy("blocker", IIT, 1.0, blocking=True, blocking_longer_than=10.0)
GENERIC = policy("idle-in-transaction", IIT, 3600.0)

DECISIONS = [
    # (id, policies, sessions, pid, acting policy or None, policy claiming it, reason fragment)
    ("blocker_is_terminated", (BLOCKER, GENERIC),
     [holder(10), waiter(20, (10,), 2), waiter(21, (20,), 1)], 10, "blocker", "blocker",
     "blocks 2 sessions (longest 2.0s)"),
    ("non_blocker_falls_through_to_the_next_policy", (BLOCKER, GENERIC),
     [holder(10), holder(11), waiter(20, (10,), 2)], 11, None, "idle-in-transaction",
     "blocker: blocks nobody"),
    ("blocker_waited_on_too_briefly_falls_through", (BLOCKER_10S, GENERIC),
     [holder(10), waiter(20, (10,), 9.5)], 10, None, "idle-in-transaction",
     "blocks 1 session (longest 9.5s), acts past 10s of waiting"),
    ("blocker_waited_on_long_enough_is_terminated", (BLOCKER_10S, GENERIC),
     [holder(10), waiter(20, (10,), 10)], 10, "blocker", "blocker", "blocks 1 session"),
    ("young_blocker_is_claimed_not_yet_due", (BLOCKER, GENERIC),
     [holder(10, idle_for=0.5), waiter(20, (10,), 0.4)], 10, None, "blocker", "not yet due"),
    ("the_waiter_itself_is_not_a_blocker", (policy("b", ("active",), 0.1, blocking=True),),
     [holder(10), waiter(20, (10,), 5)], 20, None, None, "b: blocks nobody"),
]


@pytest.mark.parametrize(("policies", "sessions", "pid", "acting", "claimed", "reason"),
                         [d[1:] for d in DECISIONS], ids=[d[0] for d in DECISIONS])
def test_blocking_policy(policies: tuple[Policy, ...], sessions: list[Session], pid: int,
                         acting: str | None, claimed: str | None, reason: str) -> None:
    d = decide(snapshot(*sessions), config(*policies), TARGET)
    acted = {a.session.pid: a.policy for a in d.actions}
    assert acted.get(pid) == acting
    v = verdict_of(d, pid)
    assert v.policy == claimed
    assert reason in v.reason, v.reason


def test_wait_threshold_brings_the_next_sweep_forward() -> None:
    d = decide(snapshot(holder(10), waiter(20, (10,), 7)), config(BLOCKER_10S), TARGET)
    assert d.actions == ()
    assert d.next_due == pytest.approx(3.0)


def test_every_action_carries_blocking_and_the_record_says_so() -> None:
    s10 = replace_xmin(holder(10), 1234)
    d = decide(snapshot(s10, waiter(20, (10,), 2), holder(11)),
               config(policy("iit", IIT, 1.0)), TARGET)
    by_pid = {a.session.pid: a for a in d.actions}
    assert by_pid[10].blocking == Blocking(1, 2.0)
    assert by_pid[11].blocking is None
    rec = make_record(Outcome(by_pid[10], "terminated"), server="s", sweep="x", query=None)
    assert rec["blocking"] == {"sessions": 1, "longest_wait_s": 2.0}
    assert rec["xmin_age"] == 1234
    rec = make_record(Outcome(by_pid[11], "terminated"), server="s", sweep="x", query=None)
    assert rec["blocking"] == {"sessions": 0, "longest_wait_s": 0.0}
    assert rec["xmin_age"] is None


def replace_xmin(s: Session, xmin_age: int) -> Session:
    return s._replace(xmin_age=xmin_age)


def test_nobody_waiting_leaves_the_map_empty() -> None:
    snap = snapshot(*(holder(100 + i) for i in range(50)))
    assert snap.blocking == {}
    assert replace(snap).blocking == {}
