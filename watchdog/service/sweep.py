"""One sweep of one target: look, decide, write ahead, act, record."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from watchdog.audit import offloop
from watchdog.audit.log import AuditError, AuditLog, make_record, shown_query
from watchdog.config.policy import Config, Target
from watchdog.core.candidates import candidates, horizon
from watchdog.core.clients import describe_client
from watchdog.core.decide import decide
from watchdog.core.model import Action, Decision, Outcome, Result, Snapshot
from watchdog.pg.act import dry_outcomes, execute
from watchdog.pg.connect import STATEMENT_TIMEOUT
from watchdog.pg.snapshot import take_snapshot
from watchdog.pgbouncer.watch import PoolerRound
from watchdog.text.timestamps import iso

if TYPE_CHECKING:
    from watchdog.pgbouncer.watch import PoolerWatch

log = logging.getLogger("watchdog.sweep")  # the name log filters know


@dataclass
class Progress:
    """How far a sweep got: its report, once it has decided (outcomes as they are known)."""

    report: SweepReport | None = None


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
    budget: asyncio.Timeout | None = None,
    progress: Progress | None = None,
) -> SweepReport:
    """Run one sweep; AuditError means nothing was signalled (or the records are pending).

    An AuditError raised after signals went out carries the report of what was done.
    `budget`: the caller's server timeout, paused while the audit log is written.
    `progress`: where the report stands, for a caller whose sweep is interrupted.
    """
    started = time.monotonic()
    snapshot, pooled = await look(conn, server, poolers, config.member_roles(), config)
    decision = decide(snapshot, config, target.name, dry_run=dry_run, explain=False)
    report = SweepReport(target.name, server, snapshot, decision, leader, poolers=pooled)
    if progress is not None:
        progress.report = report
    # Records held back by a failed write go out as soon as the log takes them again,
    # not only when another action comes; AuditError (nothing signalled) while it fails.
    # Most sweeps have none: no thread hop for them (flush_backlog checks again, locked).
    if audit.backlog:
        await offloop.call(audit, audit.flush_backlog, budget=budget)
    dry = [a for a in decision.actions if a.dry_run] if leader else []
    fresh = audit.dry_recorded.fresh(target.name, dry_outcomes(dry), snapshot.sessions)
    live = [a for a in decision.actions if not a.dry_run]
    if not leader or not (live or fresh):
        report.duration = time.monotonic() - started
        return report

    sweep = uuid.uuid4().hex[:16]

    # Each query text as records show it: redacted once, not once per record or per session
    # (an application's sessions often last ran the same statement); and each action's
    # intent record, which its final record repeats but for when and what came of it.
    shown: dict[str | None, str | None] = {}
    intents: dict[int, dict[str, Any]] = {}

    def records(items: list[Outcome]) -> list[dict[str, Any]]:
        out = []
        ts = iso(datetime.now(UTC))
        for o in items:
            s = o.action.session
            if (intent := intents.get(s.pid)) is not None:
                out.append(intent | {"ts": ts, "outcome": o.outcome, "error": o.error})
                continue
            if s.query not in shown:
                shown[s.query] = shown_query(s.query, config.audit.query)
            record = make_record(o, server=server, sweep=sweep, query=shown[s.query])
            if o.outcome == Result.INTENT:
                intents[s.pid] = record
            out.append(record)
        return out

    # A dry run records each session and policy once, not once per sweep. The report holds
    # what was done so far, should the signalling be interrupted (see _signal).
    outcomes = report.outcomes = fresh
    if live:
        outcomes += await _signal(conn, audit, live, sweep, records, budget, outcomes)
    report.records = await _built(records, outcomes, budget)
    try:
        await offloop.call(audit, audit.append, report.records, budget=budget)
    except AuditError as exc:
        # The signals went out: what they did still reaches alerts and metrics; the records
        # stay queued or held back and are written once the log takes them.
        report.duration = time.monotonic() - started
        _log_outcomes(target.name, outcomes)
        raise AuditError(str(exc), report if live else None) from None
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


async def _built(
    records: Callable[[list[Outcome]], list[dict[str, Any]]],
    items: list[Outcome],
    budget: asyncio.Timeout | None,
) -> list[dict[str, Any]]:
    """The records of ``items``, built off the loop and off the server's time budget:
    redacting a hostile megabyte of query text takes a while, and is no server trouble."""
    async with offloop.paused(budget):
        return await asyncio.to_thread(records, items)


async def _signal(
    conn: Any,
    audit: AuditLog,
    live: list[Action],
    sweep: str,
    records: Callable[[list[Outcome]], list[dict[str, Any]]],
    budget: asyncio.Timeout | None,
    done: list[Outcome],
) -> list[Outcome]:
    """Write ahead, then signal `live`; each outcome recorded honestly if interrupted.

    `done`: the sweep's outcomes so far (its dry run's); interrupted after the signalling
    statement went out, `live`'s outcomes join them there and all are recorded.
    """
    if offloop.is_stalled(audit):
        # A write is stuck already: queueing intents behind it would only pile them up.
        raise AuditError(offloop.stalled(audit))
    try:
        # Write-ahead: no signal leaves before its intent is on disk.
        intents = await _built(records, [Outcome(a, Result.INTENT) for a in live], budget)
        await offloop.call(audit, audit.write_intents, intents, budget=budget)
    except BaseException:
        # Nothing was signalled. Intents that reached the journal anyway (or will, once a
        # late write finishes) are settled as such, never left for `unconfirmed`.
        audit.submit(audit.abandon, sweep)
        raise
    known: dict[int, Outcome] = {}
    try:
        return await execute(conn, live, timeout=STATEMENT_TIMEOUT, known=known)
    except BaseException:
        # Interrupted (timeout, shutdown) after the statement went out: signals may have
        # gone out. Outcomes already known (skipped, gone, refused) stay as they are.
        why = "sweep interrupted while signalling; outcome not confirmed"
        done += [known.get(a.session.pid) or Outcome(a, Result.UNCONFIRMED, why) for a in live]
        audit.submit(audit.append, records(done))  # in order, before the log closes
        raise


async def look(
    conn: Any, server: str, poolers: PoolerWatch | None, roles: Sequence[str] = (),
    config: Config | None = None,
) -> tuple[Snapshot, PoolerRound]:
    """The snapshot, then the poolers' reads; the snapshot knows what they hold.

    ``roles``: the roles member_of rules name (Config.member_roles()). With ``config`` a
    pooler is read only when a backend from its address is a candidate (watchdog.core.candidates);
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
