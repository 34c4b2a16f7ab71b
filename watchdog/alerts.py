"""Alerts: what on-call people hear about (Sentry), behind one small interface.

Placeholder that only logs; the Sentry implementation replaces it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from watchdog.config import Config

if TYPE_CHECKING:
    from watchdog.sweep import SweepReport

log = logging.getLogger(__name__)


class Alerts:
    """Reports sweeps, saturation and watchdog trouble."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def configure(self, config: Config) -> None:
        """Apply a reloaded config."""
        self.config = config

    def checkin(self, target: str, status: str, duration: float | None = None) -> None:
        """A cron check-in for one target sweep: in_progress, ok or error."""

    def swept(self, report: SweepReport) -> None:
        """Events for a sweep that acted, and saturation crossings."""

    def trouble(self, kind: str, message: str, target: str | None = None) -> None:
        """An error event: unreachable, permission, audit, reload."""
        log.error("%s", message)

    def close(self) -> None:
        """Flush pending events."""
