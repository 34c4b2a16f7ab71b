"""The records that flow between the snapshot, the decision, the action and the audit log."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, StrEnum
from functools import cached_property
from typing import NamedTuple

from watchdog.config.vocab import Signal

CLIENT_BACKEND = "client backend"
APPLICATION_NAME = "pg-watchdog"


class Session(NamedTuple):
    """One row of pg_stat_activity, as the watchdog saw it (immutable; cheap to build)."""

    pid: int
    backend_type: str
    backend_start: datetime | None
    usename: str | None
    rolsuper: bool | None
    datname: str | None
    application_name: str
    client_addr: str | None
    state: str | None
    state_change: datetime | None
    xact_start: datetime | None
    query_start: datetime | None
    query: str | None
    leader_pid: int | None = None
    client_port: int | None = None
    # The roles named by member_of rules that this session's role is a member of.
    member_of: tuple[str, ...] = ()
    # Set only while the session waits on a lock: the pids ahead of it (pg_blocking_pids)
    # and when the wait began (pg_locks.waitstart; None for the instant before it is set).
    blocked_by: tuple[int, ...] | None = None
    wait_start: datetime | None = None
    xmin_age: int | None = None  # transactions since backend_xmin: how far it holds back vacuum

    def since(self, measured_from: str) -> datetime | None:
        """The timestamp a policy measures this session's age from."""
        value: datetime | None = getattr(self, measured_from)
        return value


class Blocking(NamedTuple):
    """How many sessions wait on one session, directly or queued behind another waiter."""

    sessions: int
    longest_wait_s: float


# pg_blocking_pids() reports the lock queue, not only the holder: when W1 and W2 both wait for
# the row X holds, W2's blocker may be W1. So a waiter counts for every session reachable from
# it through blocked_by edges, and the root that holds the lock gets them all.


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


def ordinary_slots(max_connections: int, superuser_reserved: int, reserved: int) -> int:
    """Connection slots an ordinary role can use (at least one)."""
    return max(max_connections - superuser_reserved - reserved, 1)


# -- behind a pooler ------------------------------------------------------------


@dataclass(frozen=True)
class PoolerClient:
    """The PgBouncer client linked to a backend: the real application behind it."""

    addr: str | None
    port: int | None
    user: str | None
    database: str | None
    application_name: str | None
    connect_time: str | None  # ISO 8601 UTC when PgBouncer's text could be read, else as sent


class ClientUnknown(Enum):
    """Why the real client of a backend from a pooler's address cannot be told: it is spared."""

    UNREADABLE = "unreadable"  # the pooler's console does not answer, or its answer did not fit
    INCOMPLETE = "answer incomplete"  # rows of its answer were dropped as malformed


@dataclass(frozen=True)
class PoolerLink:
    """A backend that a PgBouncer holds as a server connection; ``client`` None when unlinked.

    ``unknown`` set: the backend comes from the pooler's address while the pooler cannot say
    who its client is, so exclusions by real client cannot be judged (never acted on).
    """

    pooler: str
    client: PoolerClient | None = None
    unknown: ClientUnknown | None = None


@dataclass(frozen=True)
class Snapshot:
    """A consistent look at one server: its sessions, its limits and its clock."""

    now: datetime
    own_pid: int
    server_version_num: int
    max_connections: int
    superuser_reserved: int
    reserved: int
    sessions: tuple[Session, ...] = field(default=())
    in_recovery: bool = False  # a hot standby
    # Backends (by pid) held by a pooler of the target, as its last read showed them.
    pooled: Mapping[int, PoolerLink] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        """Connection slots an ordinary role can use."""
        return ordinary_slots(self.max_connections, self.superuser_reserved, self.reserved)

    @property
    def clients(self) -> tuple[Session, ...]:
        """The sessions holding a connection slot: every client backend, the watchdog's own too.

        The one definition of "used" for status, check, decide, alerts and metrics. The
        watchdog's own session counts because it holds a slot: the server counts it when it
        refuses a connection with "remaining connection slots are reserved".
        """
        return tuple(s for s in self.sessions if s.backend_type == CLIENT_BACKEND)

    @property
    def used(self) -> int:
        """Connection slots in use (see ``clients``)."""
        return len(self.clients)

    @property
    def saturation(self) -> float:
        """Used slots as a fraction of the ordinary ones (above 1 once reserved slots are used)."""
        return self.used / self.capacity

    @cached_property
    def own_role(self) -> str | None:
        """The watchdog's own role (its backend's usename); None if the look did not show it."""
        return next((s.usename for s in self.sessions if s.pid == self.own_pid), None)

    @cached_property
    def blocking(self) -> dict[int, Blocking]:
        """pid -> who waits on it; empty (one pass over the sessions) while nobody waits."""
        return blocking_map(self.sessions, self.now)


@dataclass(frozen=True)
class Action:
    """A decision to signal one session."""

    target: str
    policy: str
    action: Signal
    dry_run: bool
    session: Session
    measured_from: str
    age_s: float
    blocking: Blocking | None = None  # None: nobody waits on it
    link: PoolerLink | None = None  # the pooler and real client behind the session, if known


@dataclass(frozen=True)
class Verdict:
    """What the decision says about one session, for `status --explain`."""

    session: Session
    policy: str | None  # the policy acting now or later; None when spared
    reason: str  # why it is acted on, spared, or not yet due
    acting: bool
    due_in: float | None = None  # seconds until a matching policy acts on it


@dataclass(frozen=True)
class Decision:
    """The decision for one target and sweep."""

    actions: tuple[Action, ...]
    verdicts: tuple[Verdict, ...]
    over_limit: int  # actions dropped by limits.max_per_sweep
    next_due: float | None  # seconds until the next session crosses a threshold


class Result(StrEnum):
    """What happened to one action: the audit record's ``outcome``."""

    TERMINATED = "terminated"
    CANCELLED = "cancelled"
    WOULD_TERMINATE = "would_terminate"
    WOULD_CANCEL = "would_cancel"
    SKIPPED_CHANGED = "skipped_changed"
    GONE = "gone"
    FAILED = "failed"
    UNCONFIRMED = "unconfirmed"
    INTENT = "intent"  # not final: the write-ahead record of a signal about to be sent

    @classmethod
    def done(cls, signal: str) -> Result:
        """The outcome of a confirmed ``terminate`` or ``cancel``."""
        return cls.TERMINATED if signal == Signal.TERMINATE else cls.CANCELLED

    @classmethod
    def would(cls, signal: str) -> Result:
        """The outcome of a ``terminate`` or ``cancel`` a dry run records."""
        return cls.WOULD_TERMINATE if signal == Signal.TERMINATE else cls.WOULD_CANCEL


SIGNALLED = frozenset({Result.TERMINATED, Result.CANCELLED})
# The outcomes that acted, or would have in a dry run: the kills advise and alerts count.
KILLS = frozenset({*SIGNALLED, Result.WOULD_TERMINATE, Result.WOULD_CANCEL})


@dataclass(frozen=True)
class Outcome:
    """What happened to one action."""

    action: Action
    outcome: Result
    error: str | None = None
