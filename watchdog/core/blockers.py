"""Who blocks whom: the lock-wait graph of one snapshot, followed to the sessions holding locks.

pg_blocking_pids() reports the lock queue, not only the holder: when W1 and W2 both wait
for the row X holds, W2's blocker may be W1. So a waiter counts for every session reachable
from it through blocked_by edges, and the root that holds the lock gets them all.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from watchdog.core.model import Blocking, Session


def wait_seconds(session: Session, now: datetime) -> float:
    """How long ``session`` has waited for its lock (0 before the server notes the start)."""
    if session.wait_start is None:
        return 0.0
    return max((now - session.wait_start).total_seconds(), 0.0)


def blocking_map(sessions: Iterable[Session], now: datetime) -> dict[int, Blocking]:
    """pid -> how many sessions wait on it (directly or transitively) and the longest wait."""
    edges = {s.pid: (s.blocked_by, wait_seconds(s, now)) for s in sessions if s.blocked_by}
    if not edges:
        return {}
    count: dict[int, int] = {}
    longest: dict[int, float] = {}
    for waiter, (ahead, waited) in edges.items():
        # Every session this waiter is queued behind, however deep; cycles (a deadlock
        # not yet detected) end at the first repeat.
        seen = {waiter}
        stack = list(ahead)
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            count[pid] = count.get(pid, 0) + 1
            longest[pid] = max(longest.get(pid, 0.0), waited)
            nxt = edges.get(pid)
            if nxt is not None:
                stack.extend(nxt[0])
    return {pid: Blocking(n, longest[pid]) for pid, n in count.items()}


def describe(blocking: Blocking | None) -> str:
    """``blocks 3 sessions (longest 12.4s)``, or ``blocks nobody``."""
    if blocking is None:
        return "blocks nobody"
    plural = "session" if blocking.sessions == 1 else "sessions"
    return f"blocks {blocking.sessions} {plural} (longest {blocking.longest_wait_s:.1f}s)"
