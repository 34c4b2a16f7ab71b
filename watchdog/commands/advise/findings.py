"""What every `advise` finding is made of: Finding, Window, and kills counted once per session.

Every finding carries its evidence (numbers, with the window they cover) and a fix a DBA can
paste; no evidence, no finding.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from watchdog.audit.render import record_time
from watchdog.config.units import format_duration
from watchdog.config.vocab import IN_TRANSACTION, Signal
from watchdog.core.model import KILLS
from watchdog.text import timestamps

Record = Mapping[str, Any]
IIT = IN_TRANSACTION
MIN_KILLS = 5  # fewer than this is not a pattern
MIN_SHARE = 1 / 3  # of the target's kills (of that kind): the one to fix first
ORDER = (
    "stale_prepared",
    "leak",
    "exhaustion_forecast",
    "idle_in_transaction_timeout",
    "transaction_timeout",
    "statement_timeout",
    "idle_session_timeout",
    "pooling",
    "capacity",
    "reserved_connections",
    "max_per_sweep",
    "dry_run_left_on",
    "policy_unused",
)
SEVERITIES = ("high", "medium", "low")

@dataclass(frozen=True)
class Finding:
    """One piece of advice: what was seen (evidence) and what to do (fix)."""

    id: str
    severity: str
    target: str
    subject: str
    evidence: tuple[str, ...]
    fix: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity,
            "target": self.target,
            "subject": self.subject,
            "evidence": list(self.evidence),
            "fix": list(self.fix),
        }


@dataclass(frozen=True)
class Window:
    """What the records cover: from ``start`` (the first record read) to ``now``."""

    start: datetime | None
    now: datetime

    @property
    def seconds(self) -> float:
        return 0.0 if self.start is None else max((self.now - self.start).total_seconds(), 0.0)

    def text(self) -> str:
        if self.start is None:
            return "no records"
        span = format_duration(self.seconds)
        return f"{timestamps.shown(self.start)} to {timestamps.shown(self.now)} ({span})"


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Most important first: by severity, then by kind, then by subject."""
    return sorted(
        findings, key=lambda f: (SEVERITIES.index(f.severity), ORDER.index(f.id), f.subject)
    )


def kill_key(r: Record) -> tuple[Any, ...]:
    """What one kill is: a session (target, pid, backend_start); for a cancel, which ends a
    query and not the session, that session's query (its query_start) too."""
    if r.get("pid") is None or r.get("backend_start") is None:
        return ("record", id(r))  # cannot be matched with another record: counts alone
    key: tuple[Any, ...] = (r.get("target"), r.get("pid"), r.get("backend_start"))
    if r.get("action") == Signal.CANCEL:
        key += (r.get("query_start"),)
    return key


def kills_of(records: Iterable[Record]) -> list[Record]:
    """The sessions the watchdog ended (or, in a dry run, would have), each counted once.

    A dry run's would_* record and the real kill of the same session are one kill (the real
    record is kept), and so are the would_* records a dry run repeats over sweeps (the first
    is kept: the age at which it would have acted).
    """
    chosen: dict[tuple[Any, ...], Record] = {}
    for r in records:
        if r.get("outcome") not in KILLS:
            continue
        key = kill_key(r)
        kept = chosen.get(key)
        if kept is None or (_dry(kept) and not _dry(r)):
            chosen[key] = r
    return list(chosen.values())


def _dry(r: Record) -> bool:
    return str(r.get("outcome", "")).startswith("would_")


def counted_once(records: Sequence[Record], kills: Sequence[Record]) -> list[str]:
    """Evidence that says how kills were counted, when records of one session were folded."""
    keys = {kill_key(r) for r in kills}
    folded = sum(1 for r in records if r.get("outcome") in KILLS and kill_key(r) in keys)
    folded -= len(kills)
    if folded <= 0:
        return []
    return [
        f"{folded} more record{'s' if folded != 1 else ''} of the same sessions counted once:"
        " a kill is one session (pid and backend_start), so a dry run's would_* record and"
        " the real kill of that session are one kill"
    ]


def ages(records: Iterable[Record]) -> list[float]:
    return [float(a) for r in records if isinstance(a := r.get("age_s"), int | float)]


def age_text(records: Sequence[Record]) -> str:
    values = ages(records)
    if not values:
        return "age at kill unknown"
    typical, longest = statistics.median(values), max(values)
    return f"typical age at kill {format_duration(typical)}, longest {format_duration(longest)}"


def times(records: Iterable[Record]) -> list[datetime]:
    return sorted(t for r in records if (t := record_time(r.get("ts"))) is not None)


def rate_text(records: Sequence[Record], window: Window) -> str:
    """How many and how often: within their own span, and per hour over a long window."""
    ts = times(records)
    if not ts:
        return f"{len(records)} kills"
    span = (ts[-1] - ts[0]).total_seconds()
    text = f"{len(records)} kills from {timestamps.shown(ts[0])} to {timestamps.shown(ts[-1])}"
    if span >= 3600:
        text += f" ({len(records) / (span / 3600):.1f}/h while it lasted"
    else:
        text += f" (all within {format_duration(max(span, 1.0))}"
    if window.seconds >= 2 * 3600:
        text += f", {len(records) / (window.seconds / 3600):.2f}/h over the window"
    return text + ")"


def client_of(r: Record) -> str | None:
    """The real client: behind PgBouncer, the pooler's client, else the session's address."""
    pooled = r.get("pooler_client")
    if isinstance(pooled, Mapping):
        addr = pooled.get("addr")
        return str(addr) if addr else None
    if isinstance(pooled, str) and pooled:
        return pooled
    addr = r.get("client_addr")
    return str(addr) if addr else None


def through_pooler(records: Iterable[Record]) -> bool:
    return any(r.get("pooler_client") for r in records)


def top(counter: Counter[str], n: int = 3) -> str:
    return ", ".join(f"{k} ({v})" for k, v in counter.most_common(n))


def group(records: Iterable[Record], *fields: str) -> dict[tuple[Any, ...], list[Record]]:
    out: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for r in records:
        out[tuple(r.get(f) for f in fields)].append(r)
    return out


def nice_value(seconds: float) -> str:
    """A PostgreSQL duration literal at or above ``seconds``: 500ms, 30s, 5min."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 1)}ms"
    if seconds < 120:
        return f"{math.ceil(seconds)}s"
    return f"{math.ceil(seconds / 60)}min"
