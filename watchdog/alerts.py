"""Alerts: what on-call people hear about, through Sentry (sentry-sdk).

Sentry is on only when ``alerts.sentry.dsn`` is set; every method logs either
way. No integration is enabled (the asyncpg one would record SQL as
breadcrumbs), and a ``before_send`` hook scrubs the targets' passwords from
every event as a last line of defence. Nothing here may ever break a sweep:
failures to alert are logged and swallowed.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import sentry_sdk
from sentry_sdk.crons import capture_checkin

from watchdog import __version__
from watchdog.config import Config, SentryConfig
from watchdog.connect import scrub, secrets_of
from watchdog.model import CLIENT_BACKEND

if TYPE_CHECKING:
    from sentry_sdk._types import Event, Hint, LogLevelStr, MonitorConfig

    from watchdog.model import Outcome, Session
    from watchdog.sweep import SweepReport

log = logging.getLogger(__name__)

# Outcomes that acted (or would have, in a dry run), and the others as a message says them.
ACTED = frozenset({"terminated", "cancelled", "would_terminate", "would_cancel"})
PAST = {"terminate": "terminated", "cancel": "cancelled"}
NOT_ACTED = {
    "skipped_changed": "skipped (session changed)",
    "gone": "already gone",
    "failed": "failed",
    "unconfirmed": "unconfirmed",
}
TOP = 5
QUERIES_SHOWN = 3
FLUSH_TIMEOUT = 2.0


def monitor_slug(target: str) -> str:
    """The Sentry Crons monitor of one target (lowercase letters, digits, '-', '_')."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", target.lower()).strip("-")
    return f"pg-watchdog-{slug}"[:50]


def monitor_config(interval: float) -> MonitorConfig:
    """An interval schedule matching the target's sweeps; one missed interval is tolerated."""
    minutes = max(1, math.ceil(interval / 60))
    return {
        "schedule": {"type": "interval", "value": minutes, "unit": "minute"},
        "checkin_margin": minutes,
        "max_runtime": 1 + math.ceil(minutes / 2),
        "timezone": "UTC",
    }


def _top(values: list[str | None]) -> dict[str, int]:
    return dict(Counter(v if v is not None else "?" for v in values).most_common(TOP))


def _scrub_all(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, dict):
        return {_scrub_all(k, secrets): _scrub_all(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_all(v, secrets) for v in value]
    return value


def _is_denied(o: Outcome) -> bool:
    return o.outcome == "failed" and (o.error or "").startswith("permission denied")


def _clients(sessions: tuple[Session, ...]) -> list[Session]:
    return [s for s in sessions if s.backend_type == CLIENT_BACKEND]


class Alerts:
    """Reports sweeps that acted, saturation crossings, watchdog trouble and heartbeats."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._client: sentry_sdk.Client | None = None
        self._sentry: SentryConfig | None = None
        self._above: set[str] = set()  # targets over alerts.connections_above, until they drop
        self._checkins: dict[str, str] = {}  # target -> check_in_id of its sweep in progress
        self._denied: set[str] = set()  # targets whose permission trouble was reported
        self.configure(config)

    @property
    def enabled(self) -> bool:
        """Whether events go to Sentry."""
        return self._client is not None

    # -- lifecycle ---------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Apply a (reloaded) config; restarts the Sentry client only if its settings changed."""
        self.config = config
        names = {t.name for t in config.targets}
        self._above &= names
        self._denied &= names
        self._checkins = {k: v for k, v in self._checkins.items() if k in names}
        sentry = config.alerts.sentry
        if sentry == self._sentry:
            return
        self._stop()
        self._sentry = sentry
        if sentry.dsn:
            self._start(sentry.dsn, sentry.environment)
        else:
            log.info("Sentry alerts off (alerts.sentry.dsn is not set)")

    def _start(self, dsn: str, environment: str) -> None:
        try:
            sentry_sdk.init(
                dsn=dsn,
                environment=environment,
                release=f"pg-watchdog@{__version__}",
                server_name=socket.gethostname(),
                default_integrations=False,
                auto_enabling_integrations=False,
                # No PII: send_default_pii stays unset, which means False in every 2.x.
                # Since 2.75 passing it at all is a DeprecationWarning, and its successor
                # (an explicit data_collection) would switch off the SDK's own EventScrubber.
                include_local_variables=False,
                max_breadcrumbs=0,
                before_send=self._before_send,
            )
        except Exception as exc:  # BadDsn and friends: the watchdog keeps working without
            log.error("Sentry alerts off: cannot use alerts.sentry.dsn: %s", exc)
            return
        client = sentry_sdk.get_client()
        self._client = client if isinstance(client, sentry_sdk.Client) else None
        log.info("Sentry alerts on (environment %s)", environment)

    def _stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.close(timeout=FLUSH_TIMEOUT)  # flushes first: nothing exits the process unsent
        if sentry_sdk.get_client() is client:
            sentry_sdk.get_global_scope().set_client(None)

    def close(self) -> None:
        """Flush what is pending (waits up to 2 s) and stop the Sentry client."""
        self._stop()

    # -- scrubbing -----------------------------------------------------------------

    def secrets(self) -> list[str]:
        """Every target secret, as written and URL-encoded, longest first."""
        found: set[str] = set()
        for target in self.config.targets:
            for secret in secrets_of(target):
                found.update((secret, quote(secret, safe="")))
        return sorted(found, key=len, reverse=True)

    def _before_send(self, event: Event, hint: Hint) -> Event | None:
        secrets = self.secrets()
        if not secrets:
            return event
        scrubbed: Event = _scrub_all(event, secrets)
        return scrubbed

    def _capture(
        self,
        message: str,
        level: LogLevelStr,
        fingerprint: list[str],
        tags: dict[str, str],
        contexts: dict[str, dict[str, Any]],
    ) -> None:
        if self._client is None:
            return
        try:
            sentry_sdk.capture_message(
                message, level=level, fingerprint=fingerprint, tags=tags, contexts=contexts
            )
        except Exception:
            log.exception("could not hand an alert to Sentry")

    # -- events ------------------------------------------------------------------

    def checkin(self, target: str, status: str, duration: float | None = None) -> None:
        """A cron check-in for one target sweep: in_progress, then ok or error."""
        log.debug("%s: check-in %s", target, status)
        if self._client is None:
            return
        if status == "in_progress":
            check_in_id = self._checkins[target] = uuid.uuid4().hex
        else:
            check_in_id = self._checkins.pop(target, "") or uuid.uuid4().hex
        interval = next((t.interval for t in self.config.targets if t.name == target), 60.0)
        try:
            capture_checkin(
                monitor_slug=monitor_slug(target),
                check_in_id=check_in_id,
                status=status,
                duration=duration,
                monitor_config=monitor_config(interval),
            )
        except Exception:
            log.exception("could not hand a check-in to Sentry")

    def swept(self, report: SweepReport) -> None:
        """Events for a sweep that acted (one per policy), and saturation crossings."""
        try:
            self._saturation(report)
            if report.leader and report.outcomes:
                by_policy: dict[str, list[Outcome]] = {}
                for o in report.outcomes:
                    by_policy.setdefault(o.action.policy, []).append(o)
                for policy, outcomes in by_policy.items():
                    self._acted(report, policy, outcomes)
                self._permission(report)
        except Exception:
            log.exception("%s: alerting on a sweep failed", report.target)

    def _acted(self, report: SweepReport, policy: str, outcomes: list[Outcome]) -> None:
        first = outcomes[0].action
        dry = any(o.action.dry_run for o in outcomes)
        counts = Counter(o.outcome for o in outcomes)
        acted = [o for o in outcomes if o.outcome in ACTED]
        if not acted and all(
            o.outcome in ("skipped_changed", "gone") or _is_denied(o) for o in outcomes
        ):
            return  # nothing acted: sessions that moved on are no news, denials are trouble
        verb = f"would {first.action}" if dry else PAST.get(first.action, first.action)
        n = len(acted)
        message = (
            f"{verb} {n} session{'' if n == 1 else 's'} on {report.target} "
            f"(policy {policy}{', dry run' if dry else ''})"
        )
        others = [f"{counts[k]} {label}" for k, label in NOT_ACTED.items() if counts[k]]
        if others:
            message += "; " + ", ".join(others)
        sessions = [o.action.session for o in (acted or outcomes)]
        context: dict[str, Any] = {
            "server": report.server,
            "action": first.action,
            "dry_run": dry,
            "outcomes": dict(counts),
            "top_users": _top([s.usename for s in sessions]),
            "top_applications": _top([s.application_name for s in sessions]),
            "oldest_age_s": round(max(o.action.age_s for o in outcomes), 1),
            "connections": f"{report.snapshot.used}/{report.snapshot.capacity}",
        }
        if self.config.audit.query == "full":
            context["queries"] = [
                {k: r.get(k) for k in ("pid", "usename", "application_name", "query")}
                for r in report.records
                if r.get("policy") == policy
            ][:QUERIES_SHOWN]
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

    def _permission(self, report: SweepReport) -> None:
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

    def _saturation(self, report: SweepReport) -> None:
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
        clients = _clients(snap.sessions)
        self._capture(
            message,
            "error",
            fingerprint=["pg-watchdog", "saturation", target],
            tags={"target": target},
            contexts={
                "pg_watchdog": {
                    "server": report.server,
                    "used": snap.used,
                    "ordinary_slots": snap.capacity,
                    "max_connections": snap.max_connections,
                    "superuser_reserved_connections": snap.superuser_reserved,
                    "reserved_connections": snap.reserved,
                    "alert_above": f"{threshold:.0%}",
                    "by_state": _top([s.state for s in clients]),
                    "top_users": _top([s.usename for s in clients]),
                    "top_applications": _top([s.application_name for s in clients]),
                }
            },
        )

    def trouble(self, kind: str, message: str, target: str | None = None) -> None:
        """An error event about the watchdog itself: unreachable, permission, audit, reload."""
        message = scrub(message, self.secrets())  # callers pass safe text; this makes sure
        log.error("%s", message)
        tags = {"kind": kind}
        fingerprint = ["pg-watchdog", kind]
        if target is not None:
            tags["target"] = target
            fingerprint.append(target)
        self._capture(message, "error", fingerprint=fingerprint, tags=tags, contexts={})
