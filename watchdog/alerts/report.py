"""What alerts and metrics read of one sweep: service.sweep.SweepReport has it, and more.

A protocol, so that alerts/ names no type of the service above it.
"""

from __future__ import annotations

from typing import Protocol

from watchdog.core.model import Outcome, Snapshot
from watchdog.pgbouncer.watch import PoolerRound


class Swept(Protocol):
    """One sweep of one target, as far as alerts and metrics look at it."""

    target: str
    server: str
    snapshot: Snapshot
    leader: bool
    outcomes: list[Outcome]
    duration: float
    poolers: PoolerRound
