"""Property tests of the pure decision: random snapshots and policy files, one oracle.

Hypothesis draws snapshots (backend types, states including NULL, superusers and NULL
rolsuper, excluded applications and addresses, LISTEN queries, parallel workers, the
watchdog's own pid, timestamps on and around the thresholds) and valid configurations
(policies with states, thresholds, filters, exclusions (member_of too), `when`, dry_run, targets,
max_per_sweep). The oracle below re-derives every rule (the policy file's and the safety
invariants) without calling watchdog.core.decide's helpers; `decide()` must agree with it.

Examples per run: 1,500 (the full oracle: safety, verdicts, first policy wins, limits,
oldest first, next_due) + 400 (dry run from each source yields only dry actions) + 400
(each action's dry_run is the OR of its sources) + 200 (connections_above, including
exactly at the current saturation) = 2,500, in about five seconds. Thirteen hand-made
mutants of decide.py (threshold `<`, rolsuper None, sort order, `when` `>=`, own pid,
leader_pid, policy exclude, top-level dry_run, limit + 1, targets, no break, pg-watchdog
app, listeners) are each caught by these properties.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import TypeVar

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from watchdog.config.policy import Config, Exclusions, Limits, Policy, Target
from watchdog.core.decide import decide
from watchdog.core.model import Decision, Session, Snapshot

T = TypeVar("T")
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
TARGETS = ("main", "replica")
STATES = ("idle", "idle in transaction", "idle in transaction (aborted)", "active",
          "fastpath function call")
RUNNING = {"active", "fastpath function call"}
THRESHOLDS = (1.0, 60.0, 300.0, 600.0)

USERS = ("app", "etl", "svc_report", "postgres", "watchdog", "we'ird \"user\"", None)
USER_GLOBS = ("app", "etl", "svc_*", "post*", "*", "nobody")
APPS = ("web", "api-1", "pg_dump", "pg_dumpall", "psql", "PSQL", "pg-watchdog", "",
        "pg-watchdog-2", "cron\njob")
APP_GLOBS = ("pg_dump*", "psql", "api-?", "web", "*", "cron*")
DBS = ("appdb", "billing", "tenant_1", "tenant_22", None)
DB_GLOBS = ("appdb", "billing", "tenant_*", "*")
ADDRS = ("10.1.2.3", "10.200.0.1", "192.0.2.9", "2001:db8::1", "fd00::5", "::1", "127.0.0.1",
         None)
NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "10.1.2.3/32", "192.0.2.0/24", "2001:db8::/32", "::1/128", "0.0.0.0/0",
    "::/0", "fd00::/8"))
# The query texts sessions show, and whether each is a LISTEN (worked out by hand, so the
# oracle does not share decide's parser).
QUERIES: dict[str | None, bool] = {
    "SELECT 1": False,
    "COMMIT": False,
    "LISTEN jobs": True,
    "  listen \"Jobs\"": True,
    "\n\tListen x;": True,
    "/* app */ LISTEN x": True,
    "-- poll\nLISTEN x": True,
    "UNLISTEN *": False,
    "SELECT 'LISTEN'": False,
    "listener_poll()": False,
    "-- LISTEN x": False,
    None: False,
}
# The roles member_of rules name, and what the snapshot lists a session's role a member of.
ROLES = ("rds_superuser", "ops", "dev")
MEMBERSHIPS = ((), (), ("rds_superuser",), ("ops",), ("dev", "ops"),
               ("dev", "ops", "rds_superuser"))
BACKEND_TYPES = ("autovacuum worker", "autovacuum launcher", "walsender", "background worker",
                 "parallel worker", "logical replication worker", "io worker", "checkpointer",
                 "")
CLIENT = "client backend"


# -- strategies ------------------------------------------------------------------------
#
# Each session and each policy is decoded from one drawn integer (a mixed-radix number
# whose digits pick the fields): a few draws per example keep generation fast, and
# Hypothesis still shrinks towards the first option of every field.


class Digits:
    """Reads mixed-radix digits off a big integer; 0 decodes to the first option of each."""

    def __init__(self, value: int) -> None:
        self.value = value

    def below(self, n: int) -> int:
        self.value, digit = divmod(self.value, n)
        return digit

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def chance(self, one_in: int) -> bool:
        return self.below(one_in) == one_in - 1

    def subset(self, options: Sequence[T], one_in: int = 3) -> tuple[T, ...]:
        # Mostly empty: a filter or exclusion on every key would rarely let anything act.
        if not self.chance(one_in):
            return ()
        return tuple(dict.fromkeys(self.pick(options) for _ in range(1 + self.below(2))))


# Seconds before NOW: exactly on a threshold, a hair either side, or spread out.
EDGES = tuple(t + d for t in THRESHOLDS for d in (0.0, 0.0, 1e-6, -1e-6, 0.5, -0.5))
SPREAD = tuple(i * 7.31 - 2.0 for i in range(200))
BIG = st.binary(min_size=40, max_size=40).map(lambda b: int.from_bytes(b, "little"))


def session_from(pid: int, d: Digits) -> Session:
    def ts(none_one_in: int) -> datetime | None:
        offset = d.pick(EDGES) if d.chance(2) else d.pick(SPREAD)
        return None if d.chance(none_one_in) else NOW - timedelta(seconds=offset)

    backend_type = CLIENT if d.below(8) else d.pick(BACKEND_TYPES)
    leader = d.below(50) + 1 if d.chance(12) or backend_type == "parallel worker" else None
    return Session(
        pid=pid,
        backend_type=backend_type,
        usename=d.pick(USERS),
        rolsuper=d.pick((False,) * 6 + (True, None)),
        datname=d.pick(DBS),
        application_name=d.pick(APPS) if d.below(3) else "web",
        client_addr=d.pick(ADDRS),
        state=d.pick((*STATES * 3, None, "disabled")),
        query=d.pick(list(QUERIES)) if d.below(3) else "SELECT 1",
        leader_pid=leader,
        backend_start=ts(20),
        state_change=ts(20),
        xact_start=ts(3),
        query_start=ts(20),
        member_of=d.pick(MEMBERSHIPS),
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    size = draw(st.integers(0, 25))
    codes = draw(st.lists(BIG, min_size=size, max_size=size))
    first = draw(st.integers(1, 1000))
    pids = [first + 3 * i for i in range(len(codes))]
    items = tuple(session_from(pid, Digits(code)) for pid, code in zip(pids, codes, strict=True))
    d = Digits(draw(BIG))
    return Snapshot(
        now=NOW,
        own_pid=d.pick(pids) if pids and d.chance(3) else 1,
        server_version_num=d.pick((150010, 180001)),
        max_connections=4 + d.below(37),
        superuser_reserved=d.below(4),
        reserved=d.below(3),
        sessions=items,
    )


def exclusions_from(d: Digits) -> Exclusions:
    return Exclusions(
        superusers=d.chance(2),
        users=d.subset(USER_GLOBS, 5),
        applications=d.subset(APP_GLOBS, 5),
        databases=d.subset(DB_GLOBS, 5),
        client_addrs=d.subset(NETS, 5),
        listeners=d.chance(2),
        member_of=d.subset(ROLES, 4),
    )


def policy_from(name: str, d: Digits) -> Policy:
    states = frozenset(d.pick(STATES) for _ in range(1 + d.below(4)))
    # What the config loader accepts: cancel only on running states, no xact_start on idle.
    action = d.pick(("terminate", "cancel")) if states <= RUNNING else "terminate"
    froms = ["state_change", "state_change", "query_start", "backend_start"]
    if "idle" not in states:
        froms.append("xact_start")
    return Policy(
        name=name,
        states=states,
        longer_than=d.pick(THRESHOLDS) if d.below(3) else 0.001 + d.below(12000) / 10,
        action=action,
        measured_from=d.pick(froms),
        users=d.subset(USER_GLOBS, 6),
        applications=d.subset(APP_GLOBS, 6),
        databases=d.subset(DB_GLOBS, 6),
        client_addrs=d.subset(NETS, 6),
        exclude=exclusions_from(d) if d.chance(4) else Exclusions(),
        dry_run=d.chance(5),
        targets=d.pick((("main",), ("replica",), TARGETS)) if d.chance(4) else None,
        connections_above=d.pick((0.05, 0.5, 0.75, 0.9, 1.0)) if d.chance(4) else None,
        member_of=d.subset(ROLES, 6),
    )


@st.composite
def configs(draw: st.DrawFn) -> Config:
    codes = draw(st.lists(BIG, min_size=1, max_size=4))
    d = Digits(draw(BIG))
    return Config(
        source="prop.yaml",
        targets=tuple(Target(t, f"postgresql://watchdog@{t}/postgres", None, 30.0)
                      for t in TARGETS),
        policies=tuple(policy_from(f"p{i}", Digits(c)) for i, c in enumerate(codes)),
        exclude=exclusions_from(d),
        dry_run=d.chance(5),
        limits=Limits(max_per_sweep=1 + d.below(12)),
    )


@dataclass(frozen=True)
class Case:
    snapshot: Snapshot
    config: Config
    target: str
    dry_run: bool


cases = st.builds(Case, snapshots(), configs(), st.sampled_from(TARGETS),
                  st.integers(0, 4).map(lambda n: n == 0))


# -- the oracle ------------------------------------------------------------------------


def _globbed(value: str | None, patterns: tuple[str, ...]) -> bool:
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


def _in_nets(addr: str | None, nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
             ) -> bool:
    if addr is None:
        return False
    ip = ipaddress.ip_address(addr)
    return any(ip.version == n.version and ip in n for n in nets)


def own_role(snap: Snapshot) -> str | None:
    return next((o.usename for o in snap.sessions if o.pid == snap.own_pid), None)


def untouchable(s: Session, snap: Snapshot) -> bool:
    """Never signalled whatever the configuration says: non-client backends, itself, workers."""
    return (s.backend_type != CLIENT or s.pid == snap.own_pid or s.leader_pid is not None
            # Another instance: its name AND the watchdog's own role (a name is no proof).
            or (s.application_name == "pg-watchdog" and s.usename is not None
                and s.usename == own_role(snap))
            # Without pg_monitor the row's details are NULL: nothing to go on, so nothing done.
            or s.backend_start is None or s.state is None)


def excluded(s: Session, ex: Exclusions) -> bool:
    """The `exclude:` section; an unknown rolsuper counts as a superuser (never guess to kill)."""
    return ((ex.superusers and s.rolsuper is not False)
            or _globbed(s.usename, ex.users)
            or _globbed(s.application_name, ex.applications)
            or _globbed(s.datname, ex.databases)
            or _in_nets(s.client_addr, ex.client_addrs)
            or (ex.listeners and QUERIES[s.query])
            or bool(set(ex.member_of) & set(s.member_of)))


def within_filters(s: Session, p: Policy) -> bool:
    return ((not p.users or _globbed(s.usename, p.users))
            and (not p.applications or _globbed(s.application_name, p.applications))
            and (not p.databases or _globbed(s.datname, p.databases))
            and (not p.client_addrs or _in_nets(s.client_addr, p.client_addrs))
            and (not p.member_of or bool(set(p.member_of) & set(s.member_of))))


def saturation(snap: Snapshot) -> float:
    used = sum(1 for s in snap.sessions if s.backend_type == CLIENT)
    ordinary = max(snap.max_connections - snap.superuser_reserved - snap.reserved, 1)
    return used / ordinary


def age_under(s: Session, p: Policy) -> float | None:
    since: datetime | None = {
        "state_change": s.state_change,
        "xact_start": s.xact_start,
        "query_start": s.query_start,
        "backend_start": s.backend_start,
    }[p.measured_from]
    return None if since is None else (NOW - since).total_seconds()


def candidate(s: Session, p: Policy, case: Case) -> float | None:
    """The session's age if policy ``p`` applies to it now (due or not), else None."""
    if p.targets is not None and case.target not in p.targets:
        return None
    if s.state not in p.states or not within_filters(s, p) or excluded(s, p.exclude):
        return None
    if p.connections_above is not None and not saturation(case.snapshot) > p.connections_above:
        return None
    return age_under(s, p)


@dataclass(frozen=True)
class Expected:
    acting: dict[int, tuple[Policy, float]]  # pid -> its claiming policy, past its threshold
    pending: dict[int, tuple[str, float]]  # pid -> its claiming policy, not yet due, time left
    next_due: float | None


def expected(case: Case) -> Expected:
    acting: dict[int, tuple[Policy, float]] = {}
    pending: dict[int, tuple[str, float]] = {}
    dues: list[float] = []
    for s in case.snapshot.sessions:
        if untouchable(s, case.snapshot) or excluded(s, case.config.exclude):
            continue
        for p in case.config.policies:
            age = candidate(s, p, case)
            if age is None:
                continue
            if age > p.longer_than:
                acting[s.pid] = (p, age)
                break
            # The first matching policy claims the session even before it is due.
            dues.append(p.longer_than - age)
            pending[s.pid] = (p.name, p.longer_than - age)
            break
    return Expected(acting, pending, min(dues) if dues else None)


# -- properties ------------------------------------------------------------------------


def _by_name(config: Config) -> dict[str, Policy]:
    return {p.name: p for p in config.policies}


def check_safety(case: Case, d: Decision) -> None:
    """No action ever targets a session any rule spares."""
    snap, cfg = case.snapshot, case.config
    policies = _by_name(cfg)
    for a in d.actions:
        s, p = a.session, policies[a.policy]
        assert s.backend_type == CLIENT, s
        assert s.pid != snap.own_pid
        assert s.leader_pid is None
        assert not (s.application_name == "pg-watchdog" and s.usename is not None
                    and s.usename == own_role(snap))
        assert not (cfg.exclude.superusers and s.rolsuper is not False)
        assert not (p.exclude.superusers and s.rolsuper is not False)
        assert not excluded(s, cfg.exclude)
        assert not excluded(s, p.exclude)
        assert s.state in p.states
        assert within_filters(s, p)
        assert p.targets is None or case.target in p.targets
        assert p.connections_above is None or saturation(snap) > p.connections_above
        age = age_under(s, p)
        assert age is not None and age > p.longer_than
        assert a.age_s == age
        assert (a.target, a.action, a.measured_from) == (case.target, p.action, p.measured_from)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_decide_agrees_with_the_oracle(case: Case) -> None:
    d = decide(case.snapshot, case.config, case.target, dry_run=case.dry_run)
    check_safety(case, d)
    want = expected(case)
    # Coverage of the interesting cases (shown by --hypothesis-show-statistics).
    event(f"actions: {min(len(d.actions), 3)}{'+' if len(d.actions) >= 3 else ''}")
    event(f"over_limit: {d.over_limit > 0}")
    event(f"pending: {bool(want.pending)}")

    # Every session gets exactly one verdict, in snapshot order.
    assert [v.session for v in d.verdicts] == list(case.snapshot.sessions)
    for v in d.verdicts:
        pid = v.session.pid
        if pid in want.acting:
            assert (v.acting, v.policy, v.due_in) == (True, want.acting[pid][0].name, 0.0)
        elif pid in want.pending:
            name, due = want.pending[pid]
            assert (v.acting, v.policy, v.due_in) == (False, name, due)
        else:
            assert (v.acting, v.policy, v.due_in) == (False, None, None), v

    # The acting policy is the first that applies and is past its threshold.
    limit = case.config.limits.max_per_sweep
    assert len(d.actions) == min(len(want.acting), limit) <= limit
    assert d.over_limit == len(want.acting) - len(d.actions)
    for a in d.actions:
        assert a.policy == want.acting[a.session.pid][0].name
    assert d.next_due == want.next_due

    # Oldest first; what is dropped is never older than what is kept.
    ages = [a.age_s for a in d.actions]
    assert ages == sorted(ages, reverse=True)
    kept = {a.session.pid for a in d.actions}
    dropped = [age for pid, (_, age) in want.acting.items() if pid not in kept]
    assert not dropped or not ages or max(dropped) <= min(ages)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases, st.sampled_from(("argument", "top-level", "every policy")))
def test_dry_run_yields_only_dry_actions(case: Case, how: str) -> None:
    cfg = case.config
    if how == "top-level":
        cfg = Config(cfg.source, cfg.targets, cfg.policies, cfg.exclude, True, cfg.limits)
    elif how == "every policy":
        cfg = Config(cfg.source, cfg.targets,
                     tuple(Policy(**{**p.__dict__, "dry_run": True}) for p in cfg.policies),
                     cfg.exclude, False, cfg.limits)
    d = decide(case.snapshot, cfg, case.target, dry_run=how == "argument")
    assert all(a.dry_run for a in d.actions)
    # And dry run changes nothing else about the decision.
    live_cfg = Config(cfg.source, cfg.targets,
                      tuple(Policy(**{**p.__dict__, "dry_run": False}) for p in cfg.policies),
                      cfg.exclude, False, cfg.limits)
    live = decide(case.snapshot, live_cfg, case.target)
    assert not any(a.dry_run for a in live.actions)
    assert [(a.session.pid, a.policy) for a in live.actions] == [
        (a.session.pid, a.policy) for a in d.actions
    ]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_each_actions_dry_run_is_the_or_of_its_three_sources(case: Case) -> None:
    d = decide(case.snapshot, case.config, case.target, dry_run=case.dry_run)
    policies = _by_name(case.config)
    for a in d.actions:
        assert a.dry_run == (case.dry_run or case.config.dry_run or policies[a.policy].dry_run)
    assert len(d.actions) <= case.config.limits.max_per_sweep


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases, st.sampled_from((0.05, 0.5, 0.75, 0.9, 1.0, "exactly the current saturation")))
def test_connections_above_acts_only_while_the_server_is_that_full(
    case: Case, above: float | str
) -> None:
    level = saturation(case.snapshot) if isinstance(above, str) else above
    cfg = case.config
    gated = tuple(Policy(**{**p.__dict__, "connections_above": level}) for p in cfg.policies)
    cfg = Config(cfg.source, cfg.targets, gated, cfg.exclude, cfg.dry_run, cfg.limits)
    d = decide(case.snapshot, cfg, case.target)
    if not saturation(case.snapshot) > level:
        assert d.actions == ()
        assert d.next_due is None
        assert not any(v.policy for v in d.verdicts)
