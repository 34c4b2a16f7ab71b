"""The service's side of the exhaustion forecast: a history per target fed by its sweeps, one
alert per crossing, the Prometheus gauge, and the record `advise` reads.

The pure parts (the fit, the crossing) are in watchdog.core.forecast; this module only keeps their
state per target and hands the results to alerts, metrics and the forecast log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from watchdog.audit import forecast_log
from watchdog.config.policy import Config
from watchdog.core.forecast import Crossing, Forecast, History, sample_of
from watchdog.text.errors import reason as error_reason

if TYPE_CHECKING:
    from watchdog.alerts.hub import Alerts
    from watchdog.alerts.metrics import Metrics
    from watchdog.service.sweep import SweepReport

log = logging.getLogger("watchdog.forecast_watch")  # the name log filters know


class ForecastWatch:
    """Histories and crossing states of every target of one service."""

    def __init__(self) -> None:
        self.histories: dict[str, History] = {}
        self.crossings: dict[str, Crossing] = {}

    async def swept(self, report: SweepReport, config: Config, alerts: Alerts,
                    metrics: Metrics) -> Forecast | None:
        """Feed one sweep; alert, export and record what it changes. Never raises."""
        try:
            return await self._swept(report, config, alerts, metrics)
        except Exception:
            log.exception("%s: the exhaustion forecast failed", report.target)
            return None

    async def _swept(self, report: SweepReport, config: Config, alerts: Alerts,
                     metrics: Metrics) -> Forecast | None:
        self._forget_gone(config, metrics)
        name, now = report.target, time.monotonic()
        history = self.histories.setdefault(name, History())
        if not history.observe(sample_of(report.snapshot, now)):
            return None  # sampled by time: a sweep 250 ms after the last one adds nothing
        crossing = self.crossings.setdefault(name, Crossing())
        fc = history.forecast(crossing.rearmed_at)
        metrics.exhaustion(name, fc)
        if fc is None:
            return None
        within = config.alerts.exhaustion_within
        step = crossing.step(fc, now, within)
        if step is None:
            return fc
        kind, episode = step
        wall = datetime.now(UTC)
        if kind == "crossed":
            alerts.exhaustion(report, fc)
            record = forecast_log.crossed_record(
                name, report.server, fc, within, bool(report.snapshot.pooled), wall)
        else:
            log.info("%s: the exhaustion forecast is back past %ds; re-armed", name, within)
            record = forecast_log.ended_record(name, episode, wall)
        if report.leader:  # one writer per server, as for its alerts
            path = forecast_log.forecast_path(config.audit.path)
            try:
                await asyncio.to_thread(forecast_log.append, path, [record])
            except OSError as exc:
                log.warning("cannot write the forecast record to %s: %s", path,
                            error_reason(exc))
        return fc

    def _forget_gone(self, config: Config, metrics: Metrics) -> None:
        names = {t.name for t in config.targets}
        for name in [n for n in self.histories if n not in names]:
            del self.histories[name]
            self.crossings.pop(name, None)
            metrics.exhaustion(name, None)
