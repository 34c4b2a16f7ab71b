"""Punctuality: how late after its threshold crossing does an idle session die?

200 sessions go idle at evenly spread moments over 10 s (a child process runs
``pg_sleep(i * 0.05)`` on each, then leaves it idle); the policy terminates sessions idle
longer than 5 s; the target's interval is 30 s. The real ``watchdog.service.scheduler.Service`` runs
in this process, started before the sessions exist, in three schedulings:

  punctual         the Service as shipped (_next: sweep again just after the next crossing,
                   and never later than the shortest threshold)
  next_due only    _next as it was before that fix: only sessions already idle at a sweep
                   are waited for
  fixed interval   _next disabled: one sweep every 30 s

Lateness = the server's own backend exit time (``log_disconnections``, epoch ms in
``log_line_prefix``) minus (state_change + threshold) from the audit record.

    .venv/bin/python bench/punctuality.py [--major 18] [--modes punctual,next_due,fixed]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchlib import Holder, log_entries, machine, pct, setup_roles, table

from watchdog.commands.demo.tempcluster import TempCluster, start_cluster
from watchdog.config.policy import load_config
from watchdog.service import scheduler as service_module
from watchdog.service.scheduler import Service
from watchdog.service.sweep import SweepReport

SESSIONS = 200
SPREAD = 10.0
THRESHOLD = 5.0
INTERVAL = 30.0


class CountingService(Service):
    sweeps = 0

    async def _sweep(self, name: str) -> SweepReport | None:
        self.sweeps += 1
        return await super()._sweep(name)  # _run schedules the next sweep from the report


class FixedService(CountingService):
    def _next(self, name: str, started: float, report: SweepReport) -> None:
        pass


class NextDueOnlyService(CountingService):
    """_next before the horizon fix, verbatim in effect."""

    def _next(self, name: str, started: float, report: SweepReport) -> None:
        due = report.decision.next_due
        interval = self.config.target(name).interval
        if report.decision.over_limit:
            due = 0.0
        if due is None or due + service_module.MARGIN >= interval:
            return
        delay = max(
            due + service_module.MARGIN, started + service_module.FLOOR - time.monotonic(), 0.0
        )
        job = self.scheduler.get_job(name)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC) + timedelta(seconds=delay))


MODES: dict[str, type[CountingService]] = {
    "punctual": CountingService,
    "next_due": NextDueOnlyService,
    "fixed": FixedService,
}
_DISCONNECT = re.compile(r"^(\d+\.\d+) \[(\d+)\] .*LOG:  disconnection:", re.MULTILINE)


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def run_mode(pg: TempCluster, tmp: Path, mode: str) -> dict[str, Any]:
    app = f"bench-{mode}"
    audit = tmp / f"audit-{mode}.jsonl"
    path = tmp / f"policies-{mode}.yaml"
    path.write_text(
        f"""
targets: [{{name: bench, dsn: "{pg.dsn("watchdog")}", interval: {INTERVAL:g}s}}]
policies: [{{name: idle, state: idle, longer_than: {THRESHOLD:g}s, applications: ["{app}"]}}]
limits: {{max_per_sweep: {SESSIONS}}}
audit: {{path: "{audit}"}}
"""
    )
    offset = pg.log_path.stat().st_size
    service = MODES[mode](load_config(str(path)), str(path), dry_run=False)
    task = asyncio.create_task(service.run())
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        await asyncio.sleep(0.5)  # the service runs (and has swept once) before sessions exist
        holder = await loop.run_in_executor(
            None, lambda: Holder(pg.dsn("app"), SESSIONS, app, "stagger", SPREAD)
        )
        try:
            deadline = time.monotonic() + INTERVAL + SPREAD + THRESHOLD + 10
            while time.monotonic() < deadline:
                done = audit.exists() and len(audit.read_text().splitlines()) >= SESSIONS
                if done:
                    break
                await asyncio.sleep(0.2)
        finally:
            await loop.run_in_executor(None, holder.close)
    finally:
        service.stop.set()
        await asyncio.wait_for(task, 30)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.3)
    exits = {}
    for e in log_entries(pg.log_path, offset):
        if m := _DISCONNECT.match(e):
            exits[int(m.group(2))] = float(m.group(1))
    records = (
        [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    )
    late: list[float] = []
    late_audit: list[float] = []
    for r in records:
        if r["outcome"] != "terminated":
            continue
        due = _ts(r["state_change"]) + timedelta(seconds=THRESHOLD)
        late_audit.append((_ts(r["ts"]) - due).total_seconds())
        if r["pid"] in exits:
            late.append(exits[r["pid"]] - due.timestamp())
    return {
        "mode": mode,
        "killed": len(late_audit),
        "late": late,
        "late_audit": late_audit,
        "sweeps": service.sweeps,
        "elapsed": elapsed,
    }


def _fmt(values: list[float], q: float | None) -> str:
    if not values:
        return "-"
    v = min(values) if q is None else pct(values, q)
    return f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--major", type=int, default=18)
    p.add_argument("--modes", default="punctual,next_due,fixed")
    a = p.parse_args()
    modes = a.modes.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="pgwd-bench-") as t:
        tmp = Path(t)
        tmp.chmod(0o711)
        pg = start_cluster(
            a.major,
            max_connections=SESSIONS + 30,
            settings={"log_disconnections": "on", "log_line_prefix": "'%n [%p] %a '"},
            base_dir=tmp,
        )
        try:
            setup_roles(pg)
            about = machine(pg)
            for mode in modes:
                print(f"mode {mode} ...", flush=True)
                results.append(asyncio.run(run_mode(pg, tmp, mode)))
        finally:
            pg.cleanup()
    print()
    print(about)
    print(
        f"{SESSIONS} sessions going idle over {SPREAD:g}s, idle threshold {THRESHOLD:g}s, "
        f"interval {INTERVAL:g}s; lateness in s = backend exit - (state_change + threshold); "
        "target: p99 < 0.5 s punctual"
    )
    rows = []
    for r in results:
        rows.append(
            [
                r["mode"],
                r["killed"],
                len(r["late"]),
                _fmt(r["late"], None),
                _fmt(r["late"], 50),
                _fmt(r["late"], 99),
                _fmt(r["late"], 100),
                _fmt(r["late_audit"], 99),
                r["sweeps"],
                f"{r['elapsed']:.0f}",
            ]
        )
    print(
        table(
            [
                "scheduling",
                "killed",
                "exits seen",
                "min",
                "p50",
                "p99",
                "max",
                "p99 (audit ts)",
                "sweeps",
                "run s",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
