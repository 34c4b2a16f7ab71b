"""Which backends a policy could act on soon, whoever their real client is (pure, no I/O).

A sweep needs a pooler's answer only for these: for any other backend the real client
changes nothing this sweep, nor when the next one is due. So PgBouncer is read only when a
candidate comes from its address.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

from watchdog.config.policy import Config, Target
from watchdog.core.decide import excluded_by, never_touched
from watchdog.core.model import Session, Snapshot


@dataclass(frozen=True)
class Candidate:
    """A backend some policy may act on within the horizon."""

    session: Session
    due_in: float  # seconds until the soonest such policy may act; negative: it may act now

    @property
    def due_now(self) -> bool:
        return self.due_in < 0


def horizon(config: Config, target: Target) -> float:
    """How far ahead a sweep must know real clients: the service sweeps a target again within
    its interval and within its shortest threshold, so a backend further from every threshold
    is judged again, with a fresh answer, before any policy may act on it."""
    return min([target.interval] + [p.longer_than for p in config.policies
                                     if p.targets is None or target.name in p.targets])


def candidates(snapshot: Snapshot, config: Config, target: str, within: float) -> list[Candidate]:
    """The backends some policy of ``target`` may act on within ``within`` seconds.

    Judged without the pooler: every rule that looks at the real client (client_addrs,
    pooled, a policy's own filters and exclusions) is left out, so this errs towards more
    candidates, never fewer. The threshold test is decide's own, on the same snapshot.
    """
    policies = [p for p in config.policies if p.targets is None or target in p.targets]
    saturation = snapshot.saturation
    now = snapshot.now
    # Per policy: a session is near it when it entered its state before this instant.
    live = [(p, now - timedelta(seconds=p.longer_than - within)) for p in policies
            if p.connections_above is None or saturation > p.connections_above]
    # The global exclusions that do not depend on the real client spare a backend for good.
    own = replace(config.exclude, client_addrs=(), pooled=False)
    spared: dict[tuple[object, ...], bool] = {}  # sessions of one application share the answer
    out: list[Candidate] = []
    for s in snapshot.sessions:
        due: float | None = None
        for p, near in live:
            if s.state not in p.states or (since := s.since(p.measured_from)) is None:
                continue
            if since < near:
                # decide acts once age > longer_than (its very test): due_in < 0 exactly then.
                age = (now - since).total_seconds()
                left = p.longer_than - age if age <= p.longer_than else -1.0
                due = left if due is None else min(due, left)
        if due is None or never_touched(s, snapshot) is not None:
            continue
        key = (s.rolsuper, s.usename, s.application_name, s.datname, s.query, s.member_of)
        if (excused := spared.get(key)) is None:
            excused = spared[key] = excluded_by(s, own) is not None
        if not excused:
            out.append(Candidate(s, due))
    return out
