"""One sweep of one target: look, decide, write ahead, act, record."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from watchdog.act import dry_outcomes, execute
from watchdog.audit import AuditLog, make_record
from watchdog.candidates import candidates, horizon
from watchdog.config import Config, Target
from watchdog.connect import STATEMENT_TIMEOUT
from watchdog.decide import decide
from watchdog.model import Decision, Outcome, Snapshot
from watchdog.pooler import describe_client
from watchdog.pooler_watch import PoolerRound
from watchdog.snapshot import take_snapshot

if TYPE_CHECKING:
    from watchdog.pooler_watch import PoolerWatch

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one sweep saw and did."""

    target: str
    server: str
    snapshot: Snapshot
    decision: Decision
    leader: bool
    outcomes: list[Outcome] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    duration: float = 0.0
    poolers: PoolerRound = field(default_factory=PoolerRound)  # what its PgBouncers showed


async def sweep_target(
    conn: Any,
    server: str,
    config: Config,
    target: Target,
    audit: AuditLog,
    *,
    dry_run: bool = False,
    leader: bool = True,
    poolers: PoolerWatch | None = None,
) -> SweepReport:
    """Run one sweep; AuditError means nothing was signalled (or the records are pending)."""
    started = time.monotonic()
    snapshot, pooled = await look(conn, server, poolers, config.member_roles(), config)
    decision = decide(snapshot, config, target.name, dry_run=dry_run, explain=False)
    report = SweepReport(target.name, server, snapshot, decision, leader, poolers=pooled)
    # Records held back by a failed write go out as soon as the log takes them again,
    # not only when another action comes; AuditError (nothing signalled) while it fails.
    # Most sweeps have none: no thread hop for them (flush_backlog checks again, locked).
    if audit.backlog:
        await asyncio.to_thread(audit.flush_backlog)
    if not leader or not decision.actions:
        report.duration = time.monotonic() - started
        return report

    sweep = uuid.uuid4().hex[:16]
    live = [a for a in decision.actions if not a.dry_run]
    outcomes = dry_outcomes([a for a in decision.actions if a.dry_run])

    def records(items: list[Outcome]) -> list[dict[str, Any]]:
        return [
            make_record(o, server=server, sweep=sweep, query_mode=config.audit.query) for o in items
        ]

    if live:
        # Write-ahead: no signal leaves before its intent is on disk.
        intents = records([Outcome(a, "intent") for a in live])
        await asyncio.to_thread(audit.write_intents, intents)
        try:
            outcomes += await execute(conn, live, timeout=STATEMENT_TIMEOUT)
        except BaseException:
            # Cancelled mid-statement (timeout, shutdown): signals may have gone out.
            why = "sweep interrupted while signalling; outcome not confirmed"
            await asyncio.to_thread(
                audit.append, records([Outcome(a, "unconfirmed", why) for a in live])
            )
            raise
    report.outcomes = outcomes
    report.records = records(outcomes)
    await asyncio.to_thread(audit.append, report.records)
    report.duration = time.monotonic() - started
    _log_outcomes(target.name, outcomes)
    if decision.over_limit:
        log.warning(
            "%s: %d more sessions matched beyond limits.max_per_sweep=%d; next sweep",
            target.name,
            decision.over_limit,
            config.limits.max_per_sweep,
        )
    return report


async def look(
    conn: Any, server: str, poolers: PoolerWatch | None, roles: Sequence[str] = (),
    config: Config | None = None,
) -> tuple[Snapshot, PoolerRound]:
    """The snapshot, then the poolers' reads; the snapshot knows what they hold.

    ``roles``: the roles member_of rules name (Config.member_roles()). With ``config`` a
    pooler is read only when a backend from its address is a candidate (watchdog.candidates);
    without, every pooler is read (status). A pooler's trouble never fails the sweep.
    """
    snapshot = await take_snapshot(conn, STATEMENT_TIMEOUT, roles)
    if poolers is None:
        return snapshot, PoolerRound()
    target = poolers.target
    wanted = None
    if config is not None:
        wanted = candidates(snapshot, config, target.name, horizon(config, target))
    pooled = await poolers.read(snapshot, server, wanted)
    return dataclasses.replace(snapshot, pooled=pooled.links), pooled


def _log_outcomes(target: str, outcomes: list[Outcome]) -> None:
    for o in outcomes:
        log.info(
            "%s: %s pid %d (user %s, app %r, db %s, %s for %.1fs, policy %s)%s%s",
            target,
            o.outcome,
            o.action.session.pid,
            o.action.session.usename,
            o.action.session.application_name,
            o.action.session.datname,
            o.action.session.state,
            o.action.age_s,
            o.action.policy,
            f", client {describe_client(o.action.link)}" if o.action.link else "",
            f": {o.error}" if o.error else "",
        )
