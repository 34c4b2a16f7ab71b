"""The policy decision: a pure function from a snapshot and a config to actions.

No I/O here. Everything that may spare a session is decided by the rules of
watchdog/core/rules.py, applied here, so the safety rules can be tested exhaustively
without a server.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta
from operator import attrgetter
from typing import NamedTuple

from watchdog.config.policy import Config, Policy
from watchdog.core.blockers import describe as describe_blocking
from watchdog.core.model import Action, Decision, PoolerLink, Session, Snapshot, Verdict
from watchdog.core.rules import (
    NOT_LISTEN_START,
    Key,
    excluded_by,
    is_listen,
    key,
    listens_matter,
    never_touched,
    not_harmful,
    outside_filters,
    pooled_key,
)

__all__ = ["decide", "excluded_by", "never_touched"]

_UNSEEN = "?"  # not a possible reason


def decide(
    snapshot: Snapshot, config: Config, target: str, dry_run: bool = False, explain: bool = True
) -> Decision:
    """The actions one sweep of ``target`` takes, oldest first, within limits.max_per_sweep.

    ``explain``: also a verdict per session, saying why (`status --explain`); without, the
    same actions by a shorter path, for sweeps.
    """
    policies = [p for p in config.policies if p.targets is None or target in p.targets]
    if not explain:
        return _decide_for_sweep(snapshot, config, target, dry_run, policies)
    saturation = snapshot.saturation
    actions: list[Action] = []
    verdicts: list[Verdict] = []
    next_due: float | None = None
    spared: dict[Key, str | None] = {}
    outside_of: list[dict[Key, str | None]] = [{} for _ in policies]
    pooled = snapshot.pooled
    listens = listens_matter(config, policies)
    for s in snapshot.sessions:
        reason = never_touched(s, snapshot)
        if reason is None:
            link = pooled.get(s.pid) if pooled else None
            k = key(s, link, listens)
            reason = spared.get(k, _UNSEEN)
            if reason is _UNSEEN:
                reason = spared[k] = excluded_by(s, config.exclude, link)
        if reason is not None:
            verdicts.append(Verdict(s, None, reason, acting=False))
            continue
        verdict: Verdict | None = None
        why_not: list[str] = []
        for p, known in zip(policies, outside_of, strict=True):
            if s.state not in p.states:
                continue
            outside = known.get(k, _UNSEEN)
            if outside is _UNSEEN:
                outside = known[k] = outside_filters(s, p, link)
            if outside is not None:
                why_not.append(f"{p.name}: {outside}")
                continue
            since = s.since(p.measured_from)
            if since is None:
                why_not.append(f"{p.name}: no {p.measured_from}")
                continue
            age = (snapshot.now - since).total_seconds()
            if p.connections_above is not None and saturation <= p.connections_above:
                why_not.append(
                    f"{p.name}: server at {saturation:.0%}, acts above {p.connections_above:.0%}"
                )
                continue
            wait = _not_now(p, snapshot, s, age)
            if wait is not None:
                if wait.due is not None:
                    next_due = wait.due if next_due is None else min(next_due, wait.due)
                if not wait.claimed:
                    why_not.append(f"{p.name}: {wait.why}")
                    continue
                reason = "; ".join([*why_not, f"{p.name}: {wait.why}"])
                verdict = Verdict(s, p.name, reason, False, wait.due)
                break
            actions.append(_action(snapshot, config, target, dry_run, p, s, age, link))
            why = f"{p.name}: {s.state} past {p.longer_than:g}s"
            if p.blocking:
                why += f", {describe_blocking(snapshot.blocking.get(s.pid))}"
            verdict = Verdict(s, p.name, why, True, 0.0)
            break
        if verdict is None:
            verdict = Verdict(
                s, None, "; ".join(why_not) or f"no policy for state {s.state!r}", False
            )
        verdicts.append(verdict)
    return _decision(config, actions, tuple(verdicts), next_due)


class _Wait(NamedTuple):
    """Why a policy that matches a session does not act on it now."""

    # True: the policy claims the session all the same, and no later policy is tried (as in
    # pg_hba.conf, a gentler specific rule first is never overridden by a stricter generic
    # one after it). False: it passes the session on to the next policy.
    claimed: bool
    due: float | None  # seconds until it may act, when that is known
    why: str


def _not_now(p: Policy, snapshot: Snapshot, s: Session, age: float) -> _Wait | None:
    """Why ``p`` does not act on ``s`` (``age`` seconds into its state) now; None: it acts."""
    if p.blocking:
        # Computed once per snapshot, on first use: nothing while nobody waits.
        harmless = not_harmful(p, snapshot.blocking.get(s.pid))
        if harmless is not None:
            why, after = harmless
            return _Wait(False, max(after, p.longer_than - age) if after > 0 else None, why)
    if age <= p.longer_than:
        return _Wait(True, p.longer_than - age, "not yet due")
    return None


def _action(
    snapshot: Snapshot,
    config: Config,
    target: str,
    dry_run: bool,
    p: Policy,
    s: Session,
    age: float,
    link: PoolerLink | None,
) -> Action:
    dry = dry_run or config.dry_run or p.dry_run
    blocking = snapshot.blocking.get(s.pid)
    return Action(target, p.name, p.action, dry, s, p.measured_from, age, blocking, link)


def _decision(
    config: Config, actions: list[Action], verdicts: tuple[Verdict, ...], next_due: float | None
) -> Decision:
    actions.sort(key=lambda a: (-a.age_s, a.session.pid))
    limit = config.limits.max_per_sweep
    return Decision(tuple(actions[:limit]), verdicts, max(len(actions) - limit, 0), next_due)


# -- the sweep's path: the same actions, no verdicts ----------------------------------------


class _Claim(NamedTuple):
    """A policy that may claim the sessions of one group of alike sessions (config order)."""

    position: int  # the policy's among those of the target
    policy: Policy
    since: Callable[[Session], datetime | None]  # the timestamp its age is measured from
    # Entered the state at or after this: not yet due. None: the age is computed and judged
    # per session (a `blocking` policy, or a threshold with no edge).
    edge: datetime | None


_ONE_US = timedelta(microseconds=1)
# Session's fields from usename to state: role, superuser, database, application, address and
# state, as one slice (tests/test_decide_sweep_path.py pins what it holds).
_WHO = slice(Session._fields.index("usename"), Session._fields.index("state") + 1)
_FAR = 1e9  # seconds: 31 years


def _edge(now: datetime, longer_than: float) -> datetime | None:
    """The instant such that ``(now - since).total_seconds() <= longer_than`` exactly when
    ``since >= edge``, or None when there is none to compute (then the age is computed).

    total_seconds() divides whole microseconds by 10**6, correctly rounded, which is monotonic:
    the edge is ``now`` minus the largest count of microseconds that still rounds to at most
    ``longer_than``. Within a billion seconds a float tells microseconds apart, so the loops
    below step once or twice; beyond (and for inf or nan) there is no edge.
    """
    if not -_FAR <= longer_than <= _FAR:
        return None
    us = math.floor(longer_than * 1e6)
    while (us + 1) / 10**6 <= longer_than:
        us += 1
    while us / 10**6 > longer_than:
        us -= 1
    try:
        return now - us * _ONE_US
    except OverflowError:
        return None


def _claims(
    s: Session, link: PoolerLink | None, live: list[_Claim | None]
) -> tuple[_Claim, ...]:
    """The policies that may claim ``s`` (state, filters, exclusions), in order."""
    return tuple(
        c for c in live
        if c is not None and s.state in c.policy.states
        and outside_filters(s, c.policy, link) is None
    )


def _decide_for_sweep(
    snapshot: Snapshot, config: Config, target: str, dry_run: bool, policies: list[Policy]
) -> Decision:
    """decide() without verdicts. Alike sessions share which policies may claim them, so per
    session only its timestamp is compared with each policy's edge; the soonest due is
    computed once per policy, from its oldest pending session."""
    now, saturation = snapshot.now, snapshot.saturation
    # None: the policy's `when` is not met this sweep, so it claims nothing.
    live: list[_Claim | None] = [
        None
        if p.connections_above is not None and saturation <= p.connections_above
        else _Claim(
            i, p, attrgetter(p.measured_from), None if p.blocking else _edge(now, p.longer_than)
        )
        for i, p in enumerate(policies)
    ]
    oldest: list[datetime | None] = [None for _ in policies]  # pending, per policy
    actions: list[Action] = []
    next_due: float | None = None
    # Sessions that never_touched(), excluded_by() and every policy's state, filters and
    # exclusions cannot tell apart share one answer: the key holds all these rules look at
    # (rules.key's fields, the state, and never_touched's), nothing that is the session's own
    # (pid, timestamps, query text), so an application's thousand sessions are one group.
    groups: dict[tuple[object, ...], tuple[_Claim, ...]] = {}
    pooled = snapshot.pooled
    own_pid = snapshot.own_pid
    listens = listens_matter(config, policies)
    exclude = config.exclude
    for s in snapshot.sessions:
        link = pooled.get(s.pid) if pooled else None
        q = s.query
        k = (
            s[_WHO],
            s.backend_type,
            s.pid == own_pid,
            s.backend_start is None,
            s.leader_pid is None,
            s.member_of,
            listens and q is not None and q[:1] not in NOT_LISTEN_START and is_listen(q),
            None if link is None else pooled_key(link),
        )
        claims = groups.get(k)
        if claims is None:
            spared = (
                never_touched(s, snapshot) is not None
                or excluded_by(s, exclude, link) is not None
            )
            claims = groups[k] = () if spared else _claims(s, link, live)
        for c in claims:
            since = c.since(s)
            if since is None:
                continue
            edge = c.edge
            if edge is not None:
                if since >= edge:
                    # Claimed, not yet due: only the oldest such session sets when it is.
                    first = oldest[c.position]
                    if first is None or since < first:
                        oldest[c.position] = since
                    break
                age = (now - since).total_seconds()
            else:
                # Rare: the age and the harm are judged per session, as decide() does.
                age = (now - since).total_seconds()
                wait = _not_now(c.policy, snapshot, s, age)
                if wait is not None:
                    if wait.due is not None:
                        next_due = wait.due if next_due is None else min(next_due, wait.due)
                    if wait.claimed:
                        break
                    continue
            actions.append(_action(snapshot, config, target, dry_run, c.policy, s, age, link))
            break
    for p, first in zip(policies, oldest, strict=True):
        if first is not None:
            due = p.longer_than - (now - first).total_seconds()
            next_due = due if next_due is None else min(next_due, due)
    return _decision(config, actions, (), next_due)
