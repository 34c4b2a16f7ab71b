"""`pg-watchdog run`: the scheduler, signals, reload and systemd notifications.

Signal handlers only set events; the main coroutine acts on them. SIGTERM
pauses the scheduler, waits for the sweeps in flight, and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from watchdog.alerts.hub import Alerts
from watchdog.alerts.metrics import Metrics
from watchdog.audit import offloop
from watchdog.audit.log import AuditError, AuditLog
from watchdog.config.policy import Config, Target, load_config
from watchdog.config.yamlpos import ConfigError
from watchdog.core.model import SIGNALLED
from watchdog.core.unreachable import never_acts
from watchdog.pg.connect import TargetError
from watchdog.pg.prepared import PreparedWatch
from watchdog.service.forecast_watch import ForecastWatch
from watchdog.service.notify import Notifier
from watchdog.service.preflight import PreflightError, open_audit, require
from watchdog.service.resolver import Resolver
from watchdog.service.runner import TargetRunner, longest_sweep, sweep_timeout
from watchdog.service.sweep import SweepReport

log = logging.getLogger("watchdog.service")  # the name log filters know

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
# Outcomes that signalled a backend: a sweep over its limit that signalled some makes progress.


def backlog(report: SweepReport) -> bool:
    """Whether more victims wait than this sweep could take, and it took some (so the next
    sweep may too: a dry run, or signals that all failed, would only repeat itself)."""
    return (
        report.leader
        and report.decision.over_limit > 0
        and any(o.outcome in SIGNALLED for o in report.outcomes)
    )


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
        self.prepared: dict[str, PreparedWatch] = {}  # stale 2PC transactions, once per interval
        # Logs replaced by a reload (audit.path changed). Records they hold back settle intents
        # in their own journal, so they go to their own file, later; each is closed once no
        # sweep begun before the reload uses it and it holds nothing back.
        self.retired: list[AuditLog] = []
        self.audit_users: Counter[AuditLog] = Counter()
        self.reached: set[str] = set()  # targets swept once (readiness)

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

    def _target(self, name: str) -> Target | None:
        """The target called ``name``, or None once a reload has removed it."""
        return next((t for t in self.config.targets if t.name == name), None)

    async def _job(self, name: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.inflight.add(task)
        try:
            # A sweep wanted again at once (a backlog beyond limits.max_per_sweep, a session
            # about to cross) runs within this run of the job: see _next.
            while (delay := await self._run(name)) is not None:
                self._hold_trigger(name)
                await asyncio.sleep(delay)
        finally:
            self.inflight.discard(task)

    async def _run(self, name: str) -> float | None:
        """One sweep of ``name``; the delay before another within this job run, or None."""
        target = self._target(name)
        if target is None or self.stop.is_set():
            return None
        started = time.monotonic()
        self.running_since[name] = started
        # The interval trigger's next run, unless _next brings it forward.
        self.due[name] = started + target.interval
        try:
            report = await self._sweep(name)
        finally:
            self.running_since.pop(name, None)
            if self._target(name) is not None:
                self.last_done[name] = time.monotonic()
        if report is None or self.stop.is_set():
            return None
        return self._next(name, started, report)

    def _hold_trigger(self, name: str) -> None:
        """Keep the interval trigger from coming due while the job takes a backlog (it would
        only log a skipped run); a time in the future may be set from inside the job."""
        job, target = self.scheduler.get_job(name), self._target(name)
        if job is not None and target is not None:
            self.due[name] = time.monotonic() + target.interval
            job.modify(next_run_time=datetime.now(UTC) + timedelta(seconds=target.interval))

    async def _sweep(self, name: str) -> SweepReport | None:
        runner = self.runners.get(name)
        if runner is None or self.stop.is_set():
            return None
        started = time.monotonic()
        await self._flush_retired()
        audit = self.audit
        self.audit_users[audit] += 1
        try:
            report = await runner.sweep(self.config, audit, self.dry_run)
        except AuditError as exc:
            self._trouble(
                "audit", str(exc), name, "nothing will be signalled until it can be written"
            )
            if exc.report is not None:  # signals went out before the log failed: say so
                self.alerts.swept(exc.report)
                self.metrics.swept(exc.report)
            self.alerts.checkin(name, "error", time.monotonic() - started)
        except TargetError as exc:
            if exc.report is not None:  # interrupted after signalling: what it did happened
                self.alerts.swept(exc.report)
                self.metrics.swept(exc.report)
            self._trouble("unreachable", str(exc), name)
            self.alerts.checkin(name, "error", time.monotonic() - started)
        except Exception:
            log.exception("%s: sweep failed unexpectedly", name)
            self.alerts.checkin(name, "error", time.monotonic() - started)
        else:
            self.alerts.swept(report)  # what it did happened, even if a reload removed it since
            if self.runners.get(name) is not runner:
                return None
            self.reached.add(name)
            self._recovered(name)
            self.metrics.swept(report)
            self.metrics.pooled(report)
            await self.forecasts.swept(report, self.config, self.alerts, self.metrics)
            self.alerts.checkin(name, "ok", report.duration)
            watch = self.prepared.setdefault(name, PreparedWatch(name))
            self.alerts.prepared(name, await runner.prepared(watch), report.leader)
            return report
        finally:
            self.audit_users[audit] -= 1
            if self.runners.get(name) is runner:  # a removed target's series stay removed
                self.metrics.target_up(name, runner.up, runner.leader)
        return None

    def _next(self, name: str, started: float, report: SweepReport) -> float | None:
        """When to sweep ``name`` again: a delay to wait within the running job when the next
        sweep is due within FLOOR, else None (the scheduler's next run, brought forward)."""
        target = self._target(name)
        if target is None:  # removed by a reload meanwhile
            return None
        due = report.decision.next_due
        interval = target.interval
        # next_due only knows sessions already in a matched state. One that enters it just
        # after this snapshot crosses its threshold one longer_than later: look again by then.
        horizon = min(
            (p.longer_than for p in self.config.policies if p.targets is None or name in p.targets),
            default=None,
        )
        if horizon is not None:
            due = horizon if due is None else min(due, horizon)
        if backlog(report):
            due = 0.0  # more victims wait: again as soon as the floor allows
        if not report.leader and report.decision.actions:
            due = FOLLOWER_RETRY if due is None else min(due, FOLLOWER_RETRY)
        if due is None or due + MARGIN >= interval:
            return None
        # Both due and the floor count from the sweep's start (its snapshot), not from now.
        delay = max(due + MARGIN, FLOOR) - (time.monotonic() - started)
        delay = max(delay, 0.0)
        if delay < FLOOR:
            # A run asked for now (or nearly) from inside the running job is skipped: APScheduler
            # still counts this instance, and the next run comes a whole interval later.
            return delay
        job = self.scheduler.get_job(name)
        if job is not None:
            self.due[name] = time.monotonic() + delay
            job.modify(next_run_time=datetime.now(UTC) + timedelta(seconds=delay))
        return None

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
        """One alert per outage of a kind on a target, however its wording changes (a refused
        connection, then a timeout); the sweeps after it only log, until _recovered."""
        key = f"{target}:{kind}"
        line = f"{message}; {more}" if more else message
        if key not in self.troubled:
            self.troubled[key] = message
            self.alerts.trouble(kind, line, target)
        else:
            log.warning("%s", line)

    def _recovered(self, name: str) -> None:
        for key in [k for k in self.troubled if k.startswith(f"{name}:")]:
            if key == f"{name}:audit" and offloop.is_stalled(self.audit):
                continue  # a sweep that wrote nothing proves nothing about the stalled log
            log.info("%s: recovered (%s)", name, key.split(":", 1)[1])
            del self.troubled[key]

    # -- health, reload, shutdown ------------------------------------------------

    def healthy(self) -> bool:
        """Whether the scheduler keeps running every target's sweeps (successful or not).

        A target that is down is healthy here: its sweeps run and fail fast. What
        is not: a sweep stuck past its timeouts, or no sweep started for two intervals.
        """
        now = time.monotonic()
        for t in self.config.targets:
            since = self.running_since.get(t.name)
            if since is not None:
                if now - since > longest_sweep(t.interval) + 5:
                    return False
            elif now - self.last_done.get(t.name, now) > 2 * t.interval + 1:
                return False
        return True

    def ready(self) -> bool:
        """Whether the policies are loaded and every target has been swept once (/readyz)."""
        return all(t.name in self.reached for t in self.config.targets)

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
            # The checks a start makes, the same way; parsing is off the loop, since the file
            # may be hostile (an alias bomb) and the sweeps must go on meanwhile.
            new = await asyncio.to_thread(load_config, self.path)
            require(new)
            audit = await asyncio.to_thread(open_audit, new, self.audit)
        except (ConfigError, PreflightError, AuditError) as exc:
            self.alerts.trouble("reload", f"reload rejected, keeping the running policies: {exc}")
            self.notifier.ready(status="reload rejected; running the previous policies")
            return
        for line in never_acts(new):
            log.warning("%s", line)
        self.config = new
        if audit is not self.audit:
            # Same path: the same instance, which knows the sweeps in flight and its backlog.
            # A new path: records held back by the old log still go to the old file, whose
            # journal holds their intents; written to the new one, the old intents would
            # stay unsettled and be recorded `unconfirmed` there too.
            self.retired.append(self.audit)
            self.audit = audit
        self.alerts.configure(new)
        self.metrics.configure(new)
        await self._apply_targets(new)
        await self._flush_retired()
        log.info(
            "reloaded %s: %d targets, %d policies%s",
            self.path,
            len(new.targets),
            len(new.policies),
            " (dry run)" if new.dry_run or self.dry_run else "",
        )
        self.notifier.ready(status=self._status())

    async def _apply_targets(self, new: Config) -> None:
        """Targets removed, changed and added by a reload; waits for the sweeps in flight on
        the targets it changes or removes, never cancels them."""
        names = {t.name for t in new.targets}
        gone = [self.runners.pop(name) for name in list(self.runners) if name not in names]
        for runner in gone:
            name = runner.target.name
            self.scheduler.remove_job(name)
            for times in (self.due, self.last_done):
                times.pop(name, None)
            self.prepared.pop(name, None)
            self.reached.discard(name)  # added back later, it must be reached again
            for key in [k for k in self.troubled if k.startswith(f"{name}:")]:
                del self.troubled[key]  # added back later, its trouble is news again
        changed: list[tuple[TargetRunner, Target]] = []
        for t in new.targets:
            held = self.runners.get(t.name)
            if held is None:
                self.runners[t.name] = TargetRunner(t)
                self._schedule(t.name)
            elif held.target != t or held.switch_pending:
                if t.interval != held.target.interval:
                    self._retime(t.name, t.interval)
                changed.append((held, t))
        await asyncio.gather(
            *(runner.retire() for runner in gone),
            *(held.update(t, new.lock_key) for held, t in changed),
        )

    def _retime(self, name: str, interval: float) -> None:
        """A new interval, keeping a run already due sooner (a session about to cross)."""
        job = self.scheduler.get_job(name)
        if job is None:
            return
        soonest = job.next_run_time
        job.reschedule("interval", seconds=interval)
        if soonest is not None and soonest < job.next_run_time:
            job.modify(next_run_time=soonest)
        ahead = (job.next_run_time - datetime.now(UTC)).total_seconds()
        self.due[name] = time.monotonic() + max(ahead, 0.0)

    async def _flush_retired(self) -> None:
        """Write what retired logs hold back; close each one no sweep uses any more."""
        for old in list(self.retired):
            if old.backlog:
                try:
                    await asyncio.to_thread(old.flush_backlog)
                except AuditError as exc:
                    log.warning("%s; %d records held back for it", exc, len(old.backlog))
                    continue
            if old in self.retired and not old.backlog and not self.audit_users[old]:
                self.retired.remove(old)
                del self.audit_users[old]
                await asyncio.to_thread(old.close)  # settled: its journal goes, with its lock

    def _status(self) -> str:
        mode = "dry run" if self.dry_run or self.config.dry_run else "acting"
        return f"watching {len(self.config.targets)} targets ({mode})"

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; 0 on a clean stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload.set)
        self.metrics.start(self)
        self.scheduler.start()
        for line in never_acts(self.config):
            log.warning("%s", line)
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
        # Sweeps still running are cancelled; their last records must be queued before the
        # log closes (close() writes what was queued), or they would race it.
        stuck = set(self.inflight)
        self.scheduler.shutdown(wait=False)
        for task in stuck:
            task.cancel()
        if stuck:
            await asyncio.gather(*stuck, return_exceptions=True)
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
    audit = await asyncio.to_thread(open_audit, config)
    resolver = Resolver()  # slow DNS of some targets must not stall the default executor
    resolver.install(asyncio.get_running_loop())
    try:
        return await Service(config, path, dry_run, audit).run()
    finally:
        resolver.close()
