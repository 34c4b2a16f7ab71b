"""When to try a failed connection again: exponential, capped, with full jitter.

Jitter keeps several watchdogs from reconnecting in lockstep. One formula for the target's
held connection (service/runner.py) and each pooler's console (pgbouncer/watch.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BASE = 0.5  # s after the first failure, at most
CAP = 30.0  # s, at most, however many failures


def retry_at(now: float, failures: int) -> float:
    """The moment (on ``now``'s clock) to try again after ``failures`` failures in a row."""
    delay = min(CAP, BASE * 2 ** min(failures, 16))
    return now + random.uniform(delay / 2, delay)


@dataclass
class Backoff:
    """One held connection's failures in a row, and when to try it again."""

    failures: int = 0
    at: float = 0.0  # retry from this moment on (monotonic clock)

    def waiting(self, now: float) -> bool:
        """Whether an attempt now would come before the backoff is over."""
        return now < self.at

    def failed(self, now: float) -> float:
        """Count one more failure; the seconds until the next attempt."""
        self.failures += 1
        self.at = retry_at(now, self.failures)
        return self.at - now

    def recovered(self) -> int:
        """Start counting anew after a success; how many failures came before it."""
        failures, self.failures = self.failures, 0
        return failures

    def retry_now(self) -> None:
        """New settings: the next attempt need not wait."""
        self.at = 0.0
