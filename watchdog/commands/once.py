"""`pg-watchdog once`: one sweep of every target now, then a report."""

from __future__ import annotations

import asyncio
import io
import sys
from typing import Any

from watchdog.alerts.hub import Alerts
from watchdog.audit.log import AuditError, AuditLog
from watchdog.audit.render import write_table
from watchdog.config.policy import Config, Target
from watchdog.config.units import format_duration
from watchdog.pg import queries
from watchdog.pg.connect import TargetError, describe_error, target_session
from watchdog.pgbouncer.watch import PoolerWatch
from watchdog.service.preflight import open_audit
from watchdog.service.sweep import SweepReport, sweep_target
from watchdog.text.escape import json_text, log_text

# A cron job may wait this long at exit for a slow Sentry to take its alerts and check-ins.
FLUSH_AT_EXIT = 10.0


async def _one(config: Config, target: Target, audit: AuditLog, dry_run: bool) -> SweepReport:
    poolers = PoolerWatch(target) if target.poolers else None
    try:
        async with target_session(target) as (conn, server):
            # One server, one actor: a live run competes for the leader lock like `run` does
            # (released when this connection closes); a dry run never acts, so never competes.
            leader = True
            if not (dry_run or config.dry_run):
                leader = bool(await conn.fetchval(queries.TRY_LEAD, config.lock_key))
            return await sweep_target(
                conn, server, config, target, audit, dry_run=dry_run, leader=leader,
                poolers=poolers,
            )
    except (AuditError, TargetError):
        raise
    except Exception as exc:
        raise TargetError(describe_error(target, exc)) from None
    finally:
        if poolers is not None:
            await poolers.close()


def _summary(report: SweepReport) -> dict[str, Any]:
    s = report.snapshot
    return {
        "target": report.target,
        "server": report.server,
        "leader": report.leader,
        "used": s.used,
        "capacity": s.capacity,
        "max_connections": s.max_connections,
        "actions": len(report.outcomes),
        "over_limit": report.decision.over_limit,
        "duration_s": round(report.duration, 4),
        "records": report.records,
    }


async def run_once(
    config: Config, dry_run: bool = False, as_json: bool = False
) -> tuple[int, str]:
    """Sweep each target once, concurrently, and alert as `run` does; then the exit code (1 if
    any target failed) and the report to print. Records and alerts are out before it returns:
    a reader that goes away (`| head -1`) can cost nothing but output."""
    alerts = Alerts(config)
    try:
        return await _sweep_all(config, alerts, dry_run, as_json)
    except AuditError as exc:  # no target was swept: the log cannot take records
        alerts.trouble("audit", f"{exc}; nothing was signalled", logged=False)
        for t in config.targets:
            alerts.checkin(t.name, "error")
        raise
    finally:
        alerts.close(FLUSH_AT_EXIT)


async def _sweep_all(
    config: Config, alerts: Alerts, dry_run: bool, as_json: bool
) -> tuple[int, str]:
    audit = AuditLog(config.audit.path)
    try:
        # Fail closed before touching any server: a sweep that cannot record must not act.
        await asyncio.to_thread(open_audit, config, audit)
        results = await asyncio.gather(
            *(_one(config, t, audit, dry_run) for t in config.targets), return_exceptions=True
        )
    finally:
        await asyncio.to_thread(audit.close)
    failed = 0
    out: list[dict[str, Any]] = []
    text = io.StringIO()
    for target, result in zip(config.targets, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, TargetError | AuditError):
                raise result
            failed += 1
            kind = "audit" if isinstance(result, AuditError) else "unreachable"
            alerts.trouble(kind, str(result), target.name, logged=False)
            alerts.checkin(target.name, "error")
            print(f"pg-watchdog: {log_text(str(result))}", file=sys.stderr)
            done = result.report  # signals that went out before the failure
            if done is not None:  # signals went out before the log failed: say what they did
                alerts.swept(done)
                out.append(_summary(done) | {"error": str(result)})
                if not as_json:
                    write_table(done.records, text)
                continue
            out.append({"target": target.name, "error": str(result)})
            continue
        alerts.swept(result)
        alerts.checkin(target.name, "ok", result.duration)
        out.append(_summary(result))
        if not as_json:
            _describe(target, result, text)
    if as_json:
        text.write(json_text({"targets": out}, indent=2) + "\n")
    return (1 if failed else 0), text.getvalue()


def _describe(target: Target, result: SweepReport, text: io.StringIO) -> None:
    if not result.leader:
        text.write(
            f"{target.name} ({result.server}): another pg-watchdog instance holds "
            "the leader lock and acts here; this run acted on nothing\n"
        )
        return
    s = result.snapshot
    text.write(
        f"{target.name} ({result.server}): {s.used}/{s.capacity} ordinary slots used, "
        f"{len(result.outcomes)} actions"
        + (
            f", {result.decision.over_limit} left for the next sweep"
            if result.decision.over_limit
            else ""
        )
        + f" in {format_duration(result.duration)}\n"
    )
    if result.records:
        write_table(result.records, text)
