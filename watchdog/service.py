"""`pg-watchdog run`: the scheduler, signals, reload and systemd notifications.

Signal handlers only set events; the main coroutine acts on them. SIGTERM
pauses the scheduler, waits for the sweeps in flight, and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from watchdog.alerts import Alerts
from watchdog.audit import AuditError, AuditLog
from watchdog.config import Config, load_config
from watchdog.connect import TargetError
from watchdog.forecast_watch import ForecastWatch
from watchdog.metrics import Metrics
from watchdog.notify import Notifier
from watchdog.resolver import Resolver
from watchdog.runner import TargetRunner, sweep_timeout
from watchdog.sweep import SweepReport
from watchdog.yamlpos import ConfigError

log = logging.getLogger(__name__)

# Punctual kills: sweep again just after the next session crosses its threshold,
# but never more often than FLOOR.
FLOOR = 0.25
MARGIN = 0.02
# A follower that sees sessions due, which the leader should have taken, tries for the
# lock again this soon rather than an interval later: failover does not wait for it.
FOLLOWER_RETRY = 1.0
# APScheduler 3 keeps next run times in wall-clock time: after a backward step of the
# system clock no job runs until the wall clock catches up, and after a forward step every
# job is due at once. So each job's due moment is also kept on the monotonic clock, a small
# loop compares the two clocks, and on a step every job is put back at its monotonic due
# moment. Rescheduling on a detected step keeps APScheduler's own triggers, coalescing and
# max_instances; driving every run by hand from 'date' triggers would replace them all,
# and would still need the same check, since a date trigger fires by wall time too.
STEP_CHECK = 0.5
STEP_TOLERANCE = 1.0


class Service:
    """The running watchdog: one scheduled job per target."""

    def __init__(
        self, config: Config, path: str, dry_run: bool, audit: AuditLog | None = None
    ) -> None:
        self.config = config
        self.path = path
        self.dry_run = dry_run
        self.audit = audit or AuditLog(config.audit.path)
        self.alerts = Alerts(config)
        self.metrics = Metrics(config)
        self.forecasts = ForecastWatch()  # exhaustion forecast: history per target
        self.notifier = Notifier.from_env()
        self.runners: dict[str, TargetRunner] = {t.name: TargetRunner(t) for t in config.targets}
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.stop = asyncio.Event()
        self.reload = asyncio.Event()
        self.inflight: set[asyncio.Task[None]] = set()
        self.last_done: dict[str, float] = {}
        self.running_since: dict[str, float] = {}
        self.due: dict[str, float] = {}  # monotonic moment of each job's next run
        self.troubled: dict[str, str] = {}
        # Logs replaced by a reload while they still held records back: those records
        # settle intents in their own journal, so they go to their own file, later.
        self.retired: list[AuditLog] = []

    # -- scheduling ------------------------------------------------------------

    def _schedule(self, name: str) -> None:
        target = self.config.target(name)
        self.last_done[name] = time.monotonic()
        self.due[name] = time.monotonic()
        self.scheduler.add_job(
            self._job,
            "interval",
            seconds=target.interval,
            args=[name],
            id=name,
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            replace_existing=True,
        )

    async def _job(self, name: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.inflight.add(task)
        self.running_since[name] = time.monotonic()
        # The interval trigger's next run, unless _next brings it forward.
        self.due[name] = time.monotonic() + self.config.target(name).interval
        try:
            await self._sweep(name)
        finally:
            self.inflight.discard(task)
            self.running_since.pop(name, None)
            self.last_done[name] = time.monotonic()

    async def _sweep(self, name: str) -> None:
        runner = self.runners.get(name)
        if runner is None or self.stop.is_set():
            return
        started = time.monotonic()
        await self._flush_retired()
        try:
            report = await runner.sweep(self.config, self.audit, self.dry_run)
        except AuditError as exc:
            self._trouble(
                "audit", str(exc), name, "nothing will be signalled until it can be written"
            )
            self.alerts.checkin(name, "error", time.monotonic() - started)
        except TargetError as exc:
            self._trouble("unreachable", str(exc), name)
            self.alerts.checkin(name, "error", time.monotonic() - started)
        except Exception:
            log.exception("%s: sweep failed unexpectedly", name)
            self.alerts.checkin(name, "error", time.monotonic() - started)
        else:
            self._recovered(name)
            self.alerts.swept(report)
            self.metrics.swept(report)
            self.metrics.pooled(report)
            await self.forecasts.swept(report, self.config, self.alerts, self.metrics)
            self.alerts.checkin(name, "ok", report.duration)
            self._next(name, started, report)
        finally:
            self.metrics.target_up(name, runner.up, runner.leader)

    def _next(self, name: str, started: float, report: SweepReport) -> None:
        due = report.decision.next_due
        interval = self.config.target(name).interval
        # next_due only knows sessions already in a matched state. One that enters it just
        # after this snapshot crosses its threshold one longer_than later: look again by then.
        horizon = min(
            (p.longer_than for p in self.config.policies if p.targets is None or name in p.targets),
            default=None,
        )
        if horizon is not None:
            due = horizon if due is None else min(due, horizon)
        if report.decision.over_limit:
            due = 0.0  # more victims wait: come back as soon as the floor allows
        if not report.leader and report.decision.actions:
            due = FOLLOWER_RETRY if due is None else min(due, FOLLOWER_RETRY)
        if due is None or due + MARGIN >= interval:
            return
        # Both due and the floor count from the sweep's start (its snapshot), not from now.
        delay = max(due + MARGIN, FLOOR) - (time.monotonic() - started)
        delay = max(delay, 0.0)
        job = self.scheduler.get_job(name)
        if job is not None:
            self.due[name] = time.monotonic() + delay
            job.modify(next_run_time=datetime.now(UTC) + timedelta(seconds=delay))

    async def _clock_watch(self) -> None:
        offset = time.time() - time.monotonic()
        while True:
            await asyncio.sleep(STEP_CHECK)  # the loop's clock is monotonic
            now = time.time() - time.monotonic()
            step, offset = now - offset, now
            if abs(step) > STEP_TOLERANCE:
                log.warning("wall clock stepped %+.1fs; sweeps keep their monotonic times", step)
                self._reschedule()

    def _reschedule(self) -> None:
        now, wall = time.monotonic(), datetime.now(UTC)
        for name, due in self.due.items():
            job = self.scheduler.get_job(name)
            if job is not None:
                job.modify(next_run_time=wall + timedelta(seconds=max(due - now, 0.0)))

    def _trouble(self, kind: str, message: str, target: str, more: str = "") -> None:
        key = f"{target}:{kind}"
        line = f"{message}; {more}" if more else message
        if self.troubled.get(key) != message:
            self.troubled[key] = message
            self.alerts.trouble(kind, line, target)
        else:
            log.warning("%s", line)

    def _recovered(self, name: str) -> None:
        for key in [k for k in self.troubled if k.startswith(f"{name}:")]:
            log.info("%s: recovered (%s)", name, key.split(":", 1)[1])
            del self.troubled[key]

    # -- health, reload, shutdown ------------------------------------------------

    def healthy(self) -> bool:
        """Whether the scheduler keeps running every target's sweeps (successful or not).

        A target that is down is healthy here: its sweeps run and fail fast. What
        is not: a sweep stuck past its timeout, or no sweep started for two intervals.
        """
        now = time.monotonic()
        for t in self.config.targets:
            since = self.running_since.get(t.name)
            if since is not None:
                if now - since > sweep_timeout(t.interval) + 5:
                    return False
            elif now - self.last_done.get(t.name, now) > 2 * t.interval + 1:
                return False
        return True

    async def _pinger(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            if self.healthy():
                self.notifier.watchdog()
            else:
                log.error("sweeps are not completing; withholding the systemd watchdog ping")

    async def _apply_reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running policies: %s", exc)
            self.alerts.trouble("reload", f"reload rejected: {exc}")
            self.notifier.ready(status="reload rejected; running the previous policies")
            return
        old_targets = {t.name: t for t in self.config.targets}
        self.config = new
        if new.audit.path != self.audit.path:
            # Same path: keep the instance, it knows the sweeps in flight and its backlog.
            # A new path: records held back by the old log still go to the old file, whose
            # journal holds their intents; written to the new one, the old intents would
            # stay unsettled and be recorded `unconfirmed` there too.
            previous, self.audit = self.audit, AuditLog(new.audit.path)
            if previous.backlog:
                self.retired.append(previous)
                await self._flush_retired()
        self.alerts.configure(new)
        self.metrics.configure(new)
        for name, old in old_targets.items():
            if old in new.targets:
                continue
            self.scheduler.remove_job(name)
            self.due.pop(name, None)
            runner = self.runners.pop(name)
            await runner.close()
        for t in new.targets:
            if t.name not in self.runners:
                self.runners[t.name] = TargetRunner(t)
                self._schedule(t.name)
        log.info(
            "reloaded %s: %d targets, %d policies%s",
            self.path,
            len(new.targets),
            len(new.policies),
            " (dry run)" if new.dry_run or self.dry_run else "",
        )
        self.notifier.ready(status=self._status())

    async def _flush_retired(self) -> None:
        for old in self.retired:
            if old.backlog:
                try:
                    await asyncio.to_thread(old.flush_backlog)
                except AuditError as exc:
                    log.warning("%s; %d records held back for it", exc, len(old.backlog))

    def _status(self) -> str:
        mode = "dry run" if self.dry_run or self.config.dry_run else "acting"
        return f"watching {len(self.config.targets)} targets ({mode})"

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; 0 on a clean stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload.set)
        self.metrics.start()
        self.scheduler.start()
        for t in self.config.targets:
            self._schedule(t.name)
        self.notifier.ready(status=self._status())
        log.info("started: %s, policies from %s", self._status(), self.path)
        period = self.notifier.watchdog_period()
        pinger = asyncio.create_task(self._pinger(period)) if period else None
        watch = asyncio.create_task(self._clock_watch())
        try:
            while not self.stop.is_set():
                waiter = asyncio.create_task(self.reload.wait())
                stopper = asyncio.create_task(self.stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                if self.reload.is_set() and not self.stop.is_set():
                    self.reload.clear()
                    await self._apply_reload()
        finally:
            watch.cancel()
            await self._shutdown(pinger)
        return 0

    async def _shutdown(self, pinger: asyncio.Task[None] | None) -> None:
        self.notifier.stopping()
        log.info("stopping: finishing %d sweeps in flight", len(self.inflight))
        self.scheduler.pause()
        if self.inflight:
            # Each sweep ends by its own timeout at the latest.
            longest = max(sweep_timeout(t.interval) for t in self.config.targets)
            await asyncio.wait(set(self.inflight), timeout=longest + 5)
        self.scheduler.shutdown(wait=False)
        if pinger is not None:
            pinger.cancel()
        # Concurrently: each close may wait up to 2 s for a slow server.
        await asyncio.gather(*(runner.close() for runner in self.runners.values()))
        # Retired logs (audit.path changed on reload) stay open until now: a sweep begun
        # before the reload may still have written intents to one of them.
        for audit in [*self.retired, self.audit]:
            try:
                await asyncio.to_thread(audit.flush_backlog)
            except AuditError as exc:
                # Not lost: their intents stay in the journal and the next start records them.
                log.error(
                    "%s; %d records held back stay in the intent journal", exc, len(audit.backlog)
                )
            await asyncio.to_thread(audit.close)
        self.metrics.close()
        self.alerts.close()
        # Only now: a second SIGTERM during the shutdown must not kill the sweep in flight.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        log.info("stopped")


async def run_service(config: Config, path: str, dry_run: bool = False) -> int:
    """Entry point of `pg-watchdog run`; refuses to start (AuditError) if it cannot record."""
    audit = AuditLog(config.audit.path)
    await asyncio.to_thread(audit.recover)
    await asyncio.to_thread(audit.check_writable)
    resolver = Resolver()  # slow DNS of some targets must not stall the default executor
    resolver.install(asyncio.get_running_loop())
    try:
        return await Service(config, path, dry_run, audit).run()
    finally:
        resolver.close()
