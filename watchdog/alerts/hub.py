"""Alerts: what on-call people hear about, through Sentry (sentry-sdk).

This module composes the events: sweeps that acted, saturation crossings and trouble with the
watchdog itself. The Sentry client, the scrubbing of secrets and the cron check-ins are in
``watchdog.alerts.sentry``. Every method logs, with Sentry on or off. Nothing here may ever
break a sweep: failures to alert are logged and swallowed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from watchdog.alerts.pooler import PoolerAlerts
from watchdog.alerts.sentry import SentryChannel
from watchdog.config.policy import Config
from watchdog.config.units import format_duration
from watchdog.core.clients import real_addr
from watchdog.core.model import KILLS, Result
from watchdog.pg.connect import scrub

if TYPE_CHECKING:
    from watchdog.alerts.report import Swept
    from watchdog.core.forecast import Forecast, Grower
    from watchdog.core.model import Outcome, PoolerLink, Session
    from watchdog.pg.prepared import PreparedXact

log = logging.getLogger("watchdog.alerts")  # the name log filters know

# Outcomes that acted (or would have, in a dry run), and the others as a message says them.
ACTED = KILLS
NOT_ACTED = {
    Result.SKIPPED_CHANGED: "skipped (session changed)",
    Result.GONE: "already gone",
    Result.FAILED: "failed",
    Result.UNCONFIRMED: "unconfirmed",
}
TOP = 5


def _top(values: list[str | None]) -> dict[str, int]:
    return dict(Counter(v if v is not None else "?" for v in values).most_common(TOP))


def _who(sessions: list[tuple[Session, PoolerLink | None]]) -> dict[str, Any]:
    """The top roles, applications and clients (behind a pooler, the application's own
    address rather than the pooler's): what alerts.sentry.send_session_details: false omits."""
    return {
        "top_users": _top([s.usename for s, _ in sessions]),
        "top_applications": _top([s.application_name for s, _ in sessions]),
        "top_clients": _top([real_addr(s, link) for s, link in sessions]),
    }


def _is_denied(o: Outcome) -> bool:
    return o.outcome == Result.FAILED and (o.error or "").startswith("permission denied")


class Alerts(SentryChannel):
    """Reports sweeps that acted, saturation crossings, watchdog trouble and heartbeats."""

    def __init__(self, config: Config) -> None:
        self._above: set[str] = set()  # targets over alerts.connections_above, until they drop
        self._denied: set[str] = set()  # targets whose permission trouble was reported
        # Per target, the stale prepared transactions already reported (gid, prepared).
        self._prepared: dict[str, set[tuple[str, Any]]] = {}
        self.poolers = PoolerAlerts(self)
        super().__init__(config)

    def configure(self, config: Config) -> None:
        """Apply a (reloaded) config; forget the state of targets that are gone."""
        super().configure(config)
        names = {t.name for t in config.targets}
        self._above &= names
        self._denied &= names
        self._prepared = {k: v for k, v in self._prepared.items() if k in names}
        self.poolers.configure(config)

    # -- events ------------------------------------------------------------------

    def swept(self, report: Swept) -> None:
        """Events for a sweep that acted (one per policy), and saturation crossings."""
        try:
            self._saturation(report)
            self.poolers.swept(report)
            if report.leader and report.outcomes:
                by_policy: dict[str, list[Outcome]] = {}
                for o in report.outcomes:
                    by_policy.setdefault(o.action.policy, []).append(o)
                for policy, outcomes in by_policy.items():
                    self._acted(report, policy, outcomes)
                self._permission(report)
        except Exception:
            log.exception("%s: alerting on a sweep failed", report.target)

    def _acted(self, report: Swept, policy: str, outcomes: list[Outcome]) -> None:
        first = outcomes[0].action
        dry = any(o.action.dry_run for o in outcomes)
        counts = Counter(o.outcome for o in outcomes)
        acted = [o for o in outcomes if o.outcome in ACTED]
        if not acted and all(
            o.outcome in (Result.SKIPPED_CHANGED, Result.GONE) or _is_denied(o) for o in outcomes
        ):
            return  # nothing acted: sessions that moved on are no news, denials are trouble
        verb = f"would {first.action}" if dry else Result.done(first.action)
        n = len(acted)
        message = (
            f"{verb} {n} session{'' if n == 1 else 's'} on {report.target} "
            f"(policy {policy}{', dry run' if dry else ''})"
        )
        others = [f"{counts[k]} {label}" for k, label in NOT_ACTED.items() if counts[k]]
        if others:
            message += "; " + ", ".join(others)
        # Never query text, whatever audit.query says: it may hold anyone's secrets.
        context: dict[str, Any] = {
            "server": report.server,
            "action": first.action,
            "dry_run": dry,
            "outcomes": dict(counts),
            "oldest_age_s": round(max(o.action.age_s for o in outcomes), 1),
            "connections": f"{report.snapshot.used}/{report.snapshot.capacity}",
        }
        if self.config.alerts.sentry.send_session_details:
            chosen = acted or outcomes
            context |= _who([(o.action.session, o.action.link) for o in chosen])
        self._capture(
            message,
            "warning",
            fingerprint=["pg-watchdog", "acted", report.target, policy],
            tags={
                "target": report.target,
                "policy": policy,
                "dry_run": str(dry).lower(),
                "action": first.action,
            },
            contexts={"pg_watchdog": context},
        )

    def _permission(self, report: Swept) -> None:
        denied = [o for o in report.outcomes if _is_denied(o)]
        if not denied:
            self._denied.discard(report.target)
            return
        n = len(denied)
        message = (
            f"{report.target}: cannot signal {n} session{'' if n == 1 else 's'}"
            f" (policy {denied[0].action.policy}): {denied[0].error}"
        )
        if report.target in self._denied:
            log.warning("%s", message)
            return
        self._denied.add(report.target)
        self.trouble("permission", message, report.target)

    def _saturation(self, report: Swept) -> None:
        target, snap = report.target, report.snapshot
        threshold = self.config.alerts.connections_above
        level = snap.saturation
        if threshold is None:
            self._above.discard(target)
            return
        if target in self._above:
            if level < threshold:
                self._above.discard(target)
                log.info(
                    "%s: connections back to %.0f%% of slots (%d/%d), below %.0f%%",
                    target,
                    level * 100,
                    snap.used,
                    snap.capacity,
                    threshold * 100,
                )
            return
        if level <= threshold:
            return
        self._above.add(target)
        message = (
            f"{target} at {level:.0%} of connection slots "
            f"({snap.used}/{snap.capacity} ordinary slots)"
        )
        log.warning("%s, above alerts.connections_above %.0f%%", message, threshold * 100)
        if not report.leader:
            return  # the instance that acts on this server alerts; observers only log
        clients = snap.clients
        context: dict[str, Any] = {
            "server": report.server,
            "used": snap.used,
            "ordinary_slots": snap.capacity,
            "max_connections": snap.max_connections,
            "superuser_reserved_connections": snap.superuser_reserved,
            "reserved_connections": snap.reserved,
            "alert_above": f"{threshold:.0%}",
            "by_state": _top([s.state for s in clients]),
        }
        if self.config.alerts.sentry.send_session_details:
            context |= _who([(s, snap.pooled.get(s.pid)) for s in clients])
        self._capture(
            message,
            "error",
            fingerprint=["pg-watchdog", "saturation", target],
            tags={"target": target},
            contexts={"pg_watchdog": context},
        )

    def prepared(self, target: str, found: Sequence[PreparedXact] | None, leader: bool) -> None:
        """One warning per prepared transaction past alerts.prepared_older_than, ever.

        ``found`` is None when the transactions were not read this time (not due, or failed).
        """
        if found is None:
            return
        try:
            older_than = self.config.alerts.prepared_older_than
            seen = self._prepared.setdefault(target, set())
            seen &= {x.key for x in found}  # finished ones are forgotten
            for x in found:
                if x.age_s < older_than or x.key in seen:
                    continue
                seen.add(x.key)
                self._prepared_event(target, x, leader)
        except Exception:
            log.exception("%s: alerting on prepared transactions failed", target)

    def _prepared_event(self, target: str, x: PreparedXact, leader: bool) -> None:
        message = (
            f"prepared transaction {x.gid!r} on {target} is {format_duration(x.age_s)} old"
            f" (database {x.database!r}): it holds its locks and vacuum's xmin horizon"
            " until someone commits or rolls it back"
        )
        log.warning("%s; to review: %r", message, x.rollback())
        if not leader:
            return  # the instance that acts on this server alerts; observers only log
        details = x.as_json()
        if not self.config.alerts.sentry.send_session_details:
            del details["owner"]  # a role name
        self._capture(
            message,
            "warning",
            fingerprint=["pg-watchdog", "prepared", target, x.gid],
            tags={"target": target, "kind": "prepared_transaction"},
            contexts={
                "pg_watchdog": {
                    **details,
                    "older_than_s": self.config.alerts.prepared_older_than,
                    "review": f"in database {x.database}: {x.rollback()}"
                    " (pg-watchdog never runs it)",
                }
            },
        )

    def exhaustion(self, report: Swept, fc: Forecast) -> None:
        """The forecast fell within alerts.exhaustion_within: one error event per crossing,
        naming the estimate and who grows fastest (the caller keeps the crossing state)."""
        try:
            self._exhaustion(report, fc)
        except Exception:
            log.exception("%s: alerting on the exhaustion forecast failed", report.target)

    def _exhaustion(self, report: Swept, fc: Forecast) -> None:
        target, eta = report.target, fc.eta_s or 0.0
        growing = ", ".join(f"{g.name!r} {60 * g.rate:+.0f}/min" for g in fc.applications[:3])
        plain = (
            f"{target}: connection slots run out in ~{format_duration(eta)} at"
            f" {60 * fc.rate:+.0f}/min ({fc.used}/{fc.capacity} ordinary slots used)"
        )
        message = plain + (f"; growing fastest: {growing}" if growing else "")
        log.warning("%s (alerts.exhaustion_within %s)", message,
                    format_duration(self.config.alerts.exhaustion_within))
        if not report.leader:
            return  # as for saturation: the instance that acts alerts, observers only log
        details = self.config.alerts.sentry.send_session_details

        def rates(growers: tuple[Grower, ...]) -> list[dict[str, Any]]:
            return [{"name": g.name, "per_min": round(60 * g.rate, 1), "now": g.now}
                    for g in growers]

        self._capture(
            message if details else plain,
            "error",
            fingerprint=["pg-watchdog", "exhaustion", target],
            tags={"target": target, "kind": "exhaustion"},
            contexts={
                "pg_watchdog": {
                    "server": report.server,
                    "eta_s": round(eta, 1),
                    "eta_slow_end_s": round(fc.slow_eta_s or 0.0, 1),
                    "rate_per_min": round(60 * fc.rate, 1),
                    "fitted_over_s": fc.window_s,
                    "used": fc.used,
                    "ordinary_slots": fc.capacity,
                    "exhaustion_within_s": self.config.alerts.exhaustion_within,
                    "behind_pooler": bool(report.snapshot.pooled),
                }
                # Application names and client addresses: what send_session_details governs.
                | ({"growing_applications": rates(fc.applications),
                    # Behind a pooler, the applications' own addresses rather than the pooler's.
                    "growing_clients": rates(fc.clients)} if details else {})
            },
        )

    def trouble(
        self, kind: str, message: str, target: str | None = None, *, logged: bool = True
    ) -> None:
        """An error event about the watchdog itself: unreachable, permission, audit, reload.

        ``logged=False`` when the caller prints the message itself (`once`: one line each).
        """
        message = scrub(message, self.secrets())  # callers pass safe text; this makes sure
        if logged:
            log.error("%s", message)
        tags = {"kind": kind}
        fingerprint = ["pg-watchdog", kind]
        if target is not None:
            tags["target"] = target
            fingerprint.append(target)
        self._capture(message, "error", fingerprint=fingerprint, tags=tags, contexts={})
