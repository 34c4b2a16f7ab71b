"""Who blocks whom, in words: the lock-wait graph itself is model.Snapshot.blocking."""

from __future__ import annotations

from watchdog.core.model import Blocking


def describe(blocking: Blocking | None) -> str:
    """``blocks 3 sessions (longest 12.4s)``, or ``blocks nobody``."""
    if blocking is None:
        return "blocks nobody"
    plural = "session" if blocking.sessions == 1 else "sessions"
    return f"blocks {blocking.sessions} {plural} (longest {blocking.longest_wait_s:.1f}s)"
