"""The Sentry side of alerts: the client's lifecycle, secret scrubbing and cron check-ins.

Sentry is on only when ``alerts.sentry.dsn`` is set. No integration is enabled (the asyncpg
one would record SQL as breadcrumbs), and a ``before_send`` hook scrubs the targets' passwords
from every event as a last line of defence. What the events say is composed in
``watchdog.alerts.hub``.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import sentry_sdk
from sentry_sdk.crons import capture_checkin

from watchdog import __version__
from watchdog.config.policy import Config, SentryConfig
from watchdog.pg.connect import scrub, secrets_of

if TYPE_CHECKING:
    from sentry_sdk._types import Event, Hint, LogLevelStr, MonitorConfig

# The logger alerting always had: log lines and journal filters keep naming watchdog.alerts.
log = logging.getLogger("watchdog.alerts")

FLUSH_TIMEOUT = 2.0
# sentry-sdk sends one envelope at a time and drops new ones silently once this many wait.
# Its default (100) is a few seconds of a storm against a Sentry that answers slowly; the
# check-ins are paced below, and this leaves room for a burst of acted events.
TRANSPORT_QUEUE = 1000


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


def _scrub_all(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, dict):
        return {_scrub_all(k, secrets): _scrub_all(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_all(v, secrets) for v in value]
    return value


@dataclass
class _Pace:
    """The check-ins of one target: when the last one of its interval went out, and how."""

    sent_at: float | None = None  # monotonic time of the interval's check-in (or pair)
    status: str = ""  # the last closing status sent: ok or error
    open_id: str | None = None  # the in_progress check-in awaiting its ok or error


class SentryChannel:
    """The Sentry client across reloads, scrubbing, capture and check-ins; Alerts builds on it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._client: sentry_sdk.Client | None = None
        self._sentry: SentryConfig | None = None
        self._pace: dict[str, _Pace] = {}  # target -> its check-ins so far
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
        self._pace = {k: v for k, v in self._pace.items() if k in names}
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
                transport_queue_size=TRANSPORT_QUEUE,
            )
        except Exception as exc:  # BadDsn and friends: the watchdog keeps working without
            log.error("Sentry alerts off: cannot use alerts.sentry.dsn: %s", exc)
            return
        client = sentry_sdk.get_client()
        self._client = client if isinstance(client, sentry_sdk.Client) else None
        log.info("Sentry alerts on (environment %s)", environment)

    def _stop(self, timeout: float = FLUSH_TIMEOUT) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.close(timeout=timeout)  # flushes first: nothing exits the process unsent
        if sentry_sdk.get_client() is client:
            sentry_sdk.get_global_scope().set_client(None)

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Flush what is pending (waiting up to ``timeout`` s) and stop the Sentry client."""
        self._stop(timeout)

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

    # -- check-ins -----------------------------------------------------------------

    def checkin(self, target: str, status: str, duration: float | None = None) -> None:
        """A cron check-in for one target: ok or error, or in_progress then ok or error.

        At most one check-in (or in_progress pair) per target interval goes out, however
        often the target is swept; an error after an ok goes out at once, once per interval.
        """
        if self._client is None:
            log.debug("%s: check-in %s", target, status)
            return
        interval = next((t.interval for t in self.config.targets if t.name == target), 60.0)
        pace = self._pace.setdefault(target, _Pace())
        now = time.monotonic()
        due = pace.sent_at is None or now - pace.sent_at >= interval
        if status == "in_progress":
            if not due:
                return
            pace.sent_at, pace.open_id = now, uuid.uuid4().hex
            check_in_id = pace.open_id
        elif pace.open_id is not None:
            check_in_id, pace.open_id, pace.status = pace.open_id, None, status
        elif due or (status == "error" and pace.status != "error"):
            if due:
                pace.sent_at = now
            check_in_id, pace.status = uuid.uuid4().hex, status
        else:
            return  # this interval's check-in went out already
        log.debug("%s: check-in %s", target, status)
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
