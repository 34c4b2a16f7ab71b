"""Alerts about the PgBouncers in front of a target: clients queueing, the client limit near,
a pooler that cannot be read. Each fires once per crossing and clears when the level drops
back below its threshold, like the saturation alert.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from watchdog.config.policy import Config

if TYPE_CHECKING:
    from sentry_sdk._types import LogLevelStr

    from watchdog.alerts.report import Swept
    from watchdog.pgbouncer.console import PoolerLook

log = logging.getLogger("watchdog.alerts_pooler")  # the name log filters know


class _Channel(Protocol):
    config: Config

    def _capture(
        self,
        message: str,
        level: LogLevelStr,
        fingerprint: list[str],
        tags: dict[str, str],
        contexts: dict[str, dict[str, Any]],
    ) -> None: ...

    def trouble(self, kind: str, message: str, target: str | None = None) -> None: ...


class PoolerAlerts:
    """The pooler half of :class:`watchdog.alerts.hub.Alerts`."""

    def __init__(self, channel: _Channel) -> None:
        self.channel = channel
        self._waiting: set[tuple[str, str]] = set()  # (target, pooler) past pooler_wait_above
        self._full: set[tuple[str, str]] = set()  # (target, pooler) past connections_above
        self._down: dict[tuple[str, str], str] = {}  # (target, pooler) -> error reported

    def configure(self, config: Config) -> None:
        """Forget poolers that are gone from the config."""
        known = {(t.name, p.name) for t in config.targets for p in t.poolers}
        self._waiting &= known
        self._full &= known
        self._down = {k: v for k, v in self._down.items() if k in known}

    def swept(self, report: Swept) -> None:
        """Unreachable poolers (once each until they answer again), then the crossings."""
        target = report.target
        for pooler, error in report.poolers.errors.items():
            key = (target, pooler)
            if key in self._down:
                continue  # reported once; watchdog.pgbouncer.watch logs each attempt
            self._down[key] = error
            # Its backends are spared meanwhile (watchdog.pgbouncer.watch): the real client
            # cannot be told, so neither can the exclusions that name it.
            self.channel.trouble(
                "pooler",
                f"{error.removesuffix(' (retrying)')}; backends from its address are spared"
                " until it answers",
                target,
            )
        for look in report.poolers.looks:
            if self._down.pop((target, look.name), None) is not None:
                log.info("%s: pooler %s answers again", target, look.name)
            self._wait(report, look)
            self._clients(report, look)

    @staticmethod
    def _cross(state: set[tuple[str, str]], key: tuple[str, str], above: bool, below: bool) -> bool:
        """Whether this is a new crossing (and remember it until the level drops below)."""
        if key in state:
            if below:
                state.discard(key)
            return False
        if not above:
            return False
        state.add(key)
        return True

    def _wait(self, report: Swept, look: PoolerLook) -> None:
        limit = self.channel.config.alerts.pooler_wait_above
        pools = look.pools()
        worst = max(pools, key=lambda p: p.maxwait_s, default=None)
        wait = worst.maxwait_s if worst is not None else 0.0
        key = (report.target, look.name)
        if worst is None or not self._cross(self._waiting, key, wait > limit, wait < limit):
            return
        waiting = sum(p.cl_waiting for p in pools)

        def says(pool: str) -> str:
            return (
                f"{report.target}: {waiting} client{'' if waiting == 1 else 's'} queued in"
                f" pooler {look.name}, the oldest for {wait:.1f}s (pool {pool})"
            )

        log.warning(
            "%s, above alerts.pooler_wait_above %gs", says(f"{worst.database}/{worst.user}"), limit
        )
        if not report.leader:
            return
        # send_session_details: false leaves the role names out of the event.
        details = self.channel.config.alerts.sentry.send_session_details
        message = says(f"{worst.database}/{worst.user}" if details else worst.database)
        self.channel._capture(
            message,
            "error",
            fingerprint=["pg-watchdog", "pooler-wait", report.target, look.name],
            tags={"target": report.target, "pooler": look.name},
            contexts={"pg_watchdog": {
                "alert_above_s": limit,
                "pools": [
                    {"database": p.database, "user": p.user if details else None,
                     "cl_active": p.cl_active, "cl_waiting": p.cl_waiting,
                     "sv_active": p.sv_active, "sv_idle": p.sv_idle,
                     "maxwait_s": round(p.maxwait_s, 3)}
                    for p in pools if p.cl_waiting
                ],
            }},
        )

    def _clients(self, report: Swept, look: PoolerLook) -> None:
        threshold = self.channel.config.alerts.connections_above
        key = (report.target, look.name)
        if threshold is None or not look.max_client_conn:
            self._full.discard(key)
            return
        level = look.clients_used / look.max_client_conn
        if not self._cross(self._full, key, level > threshold, level < threshold):
            return
        message = (
            f"{report.target}: pooler {look.name} at {level:.0%} of max_client_conn"
            f" ({look.clients_used}/{look.max_client_conn} clients)"
        )
        log.warning("%s, above alerts.connections_above %.0f%%", message, threshold * 100)
        if not report.leader:
            return
        self.channel._capture(
            message,
            "error",
            fingerprint=["pg-watchdog", "pooler-clients", report.target, look.name],
            tags={"target": report.target, "pooler": look.name},
            contexts={"pg_watchdog": {
                "clients": look.clients_used,
                "max_client_conn": look.max_client_conn,
                "alert_above": f"{threshold:.0%}",
            }},
        )
