"""Blockers cost, CPU only (no server): what the lock-wait graph adds to decide().

For 1,000 and 5,000 sessions: the blocking map alone with nobody waiting and with 10% of
the sessions waiting (queues of five behind each holder), and decide() with the default
policies against the same plus a `blocking: true` policy first. Process CPU time, minimum
of --repeat rounds, so a busy machine disturbs it less than wall-clock figures.

    .venv/bin/python bench/blockers_cost.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchlib import table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watchdog.config.policy import Config, Policy, Target
from watchdog.core.decide import decide
from watchdog.core.model import CLIENT_BACKEND, Session, Snapshot, blocking_map

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
IIT = frozenset({"idle in transaction", "idle in transaction (aborted)"})


def sessions(n: int, waiting: bool) -> list[Session]:
    out = []
    for i in range(n):
        pid = 1000 + i
        blocked_by: tuple[int, ...] | None = None
        state = "idle" if i % 2 else "idle in transaction"
        if waiting and i % 10 == 0 and i % 50:
            blocked_by, state = (pid - 10,), "active"  # queued behind the previous waiter
        out.append(Session(
            pid, CLIENT_BACKEND, NOW - timedelta(hours=1), "app", False, "appdb", f"web-{i % 20}",
            f"10.0.{i % 7}.{i % 250}", state, NOW - timedelta(seconds=30), NOW, NOW, "SELECT 1",
            blocked_by=blocked_by, wait_start=NOW - timedelta(seconds=5) if blocked_by else None,
        ))
    return out


def config(blocking: bool) -> Config:
    policies = [Policy("idle", frozenset({"idle"}), 600.0), Policy("iit", IIT, 300.0)]
    if blocking:
        policies.insert(0, Policy("blockers", IIT, 60.0, blocking=True))
    return Config("bench", (Target("main", "postgresql://w@h/p", None, 30.0),), tuple(policies))


def cpu_ms(fn: Callable[[], object], repeat: int, number: int = 20) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time))
    return best / number * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=15)
    a = p.parse_args()
    rows = []
    for n in (1000, 5000):
        for waiting in (False, True):
            ss = sessions(n, waiting)
            snap = Snapshot(NOW, 1, 180000, n + 10, 3, 0, tuple(ss))
            waiters = sum(1 for s in ss if s.blocked_by)

            def fresh(blocking: bool, snap: Snapshot = snap) -> object:
                # A new Snapshot each time: the map is cached per snapshot, as per sweep.
                s = replace(snap)
                return decide(s, config(blocking), "main", dry_run=True, explain=False)

            rows.append([
                n, waiters,
                f"{cpu_ms(lambda ss=ss: blocking_map(ss, NOW), a.repeat):.3f}",
                f"{cpu_ms(lambda: fresh(False), a.repeat):.2f}",
                f"{cpu_ms(lambda: fresh(True), a.repeat):.2f}",
            ])
    print(f"process CPU ms, minimum of {a.repeat} rounds of 20")
    print(table(["sessions", "waiting", "blocking_map", "decide()", "decide()+blocking"], rows))


if __name__ == "__main__":
    main()
