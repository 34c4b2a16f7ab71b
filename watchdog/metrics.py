"""Prometheus metrics (opt-in): placeholder that records nothing; replaced by the real one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from watchdog.config import Config

if TYPE_CHECKING:
    from watchdog.sweep import SweepReport


class Metrics:
    """Exposes sweep results on the configured listen address."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def start(self) -> None:
        """Start serving, if metrics are configured."""

    def swept(self, report: SweepReport) -> None:
        """Count one sweep's actions and connections."""

    def target_up(self, target: str, up: bool, leader: bool) -> None:
        """Whether a target is reachable, and whether this instance acts on it."""

    def close(self) -> None:
        """Stop serving."""
