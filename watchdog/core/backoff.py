"""When to try a failed connection again: exponential, capped, with full jitter.

Jitter keeps several watchdogs from reconnecting in lockstep. One formula for the target's
held connection (service/runner.py) and each pooler's console (pgbouncer/watch.py).
"""

from __future__ import annotations

import random

BASE = 0.5  # s after the first failure, at most
CAP = 30.0  # s, at most, however many failures


def retry_at(now: float, failures: int) -> float:
    """The moment (on ``now``'s clock) to try again after ``failures`` failures in a row."""
    delay = min(CAP, BASE * 2 ** min(failures, 16))
    return now + random.uniform(delay / 2, delay)
