"""What a dry run has recorded already: each session and policy once, not once per sweep.

A dry-run instance sees the same leaked sessions every sweep; writing a ``would_*``
record each time would fill the disk (50 sessions at a 30 s interval: a million lines
a week), and a full disk stops every kill. A session is (pid, backend_start), so a new
backend that reuses a pid is new. Sessions no longer on the server are forgotten at each
sweep of their target, so memory stays bounded by the sessions present.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from watchdog.core.model import Outcome, Session

_Key = tuple[str, int, datetime | None]  # policy, pid, backend_start


def _key(o: Outcome) -> _Key:
    s = o.action.session
    return (o.action.policy, s.pid, s.backend_start)


class DryRunMemory:
    """The would_* outcomes recorded, per target, for the sessions still present."""

    def __init__(self) -> None:
        self._seen: dict[str, set[_Key]] = {}

    def fresh(
        self, target: str, outcomes: Sequence[Outcome], sessions: Iterable[Session]
    ) -> list[Outcome]:
        """The outcomes of `outcomes` not recorded before; they count as recorded from now.

        `sessions`: every session of the target's latest snapshot (the others are forgotten).
        """
        seen = self._seen.get(target, set())
        if seen:  # most sweeps remember nothing: no pass over every session for them
            present = {(s.pid, s.backend_start) for s in sessions}
            seen = {k for k in seen if (k[1], k[2]) in present}
        new = [o for o in outcomes if _key(o) not in seen]
        seen.update(_key(o) for o in new)
        self._seen[target] = seen
        return new

    def size(self) -> int:
        """How many (session, policy) pairs are remembered, over all targets."""
        return sum(len(s) for s in self._seen.values())
