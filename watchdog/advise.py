"""`pg-watchdog advise`: from relief to cure. Pure analysis of audit records and live looks.

Every finding carries its evidence (numbers, with the window they cover) and a fix a DBA can
paste; no evidence, no finding. This module reads the audit history for the leak; the
findings that need the server's side are in advise_server.py, those about the watchdog's
own settings in advise_own.py.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from watchdog.config import Config
from watchdog.review_render import record_time
from watchdog.units import format_duration

Record = Mapping[str, Any]
KILLS = ("terminated", "cancelled", "would_terminate", "would_cancel")
IIT = ("idle in transaction", "idle in transaction (aborted)")
MIN_KILLS = 5  # fewer than this is not a pattern
MIN_SHARE = 1 / 3  # of the target's kills (of that kind): the one to fix first
ORDER = (
    "leak",
    "exhaustion_forecast",
    "idle_in_transaction_timeout",
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

# The usual pools' knobs: (application_name fragments, the pool, the knob).
POOLS = (
    (("sqlalchemy", "alembic", "flask", "fastapi"), "SQLAlchemy",
     "create_engine(..., pool_pre_ping=True, pool_recycle=300)"),
    (("django",), "Django", "DATABASES[...]['CONN_MAX_AGE'] = 60 and CONN_HEALTH_CHECKS = True"),
    (("node", "pg-pool", "express", "nest"), "node-postgres",
     "new Pool({ idleTimeoutMillis: 10000, max: ... })"),
    (("hikari", "jdbc", "java", "spring"), "HikariCP",
     "idleTimeout=60000, maxLifetime=1800000 (and leakDetectionThreshold to find the leak)"),
)


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
        return f"{when_text(self.start)} to {when_text(self.now)} ({format_duration(self.seconds)})"


def when_text(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%SZ")


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Most important first: by severity, then by kind, then by subject."""
    return sorted(
        findings, key=lambda f: (SEVERITIES.index(f.severity), ORDER.index(f.id), f.subject)
    )


def kills_of(records: Iterable[Record]) -> list[Record]:
    """The records of sessions the watchdog ended (or, in a dry run, would have)."""
    return [r for r in records if r.get("outcome") in KILLS]


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
    text = f"{len(records)} kills from {when_text(ts[0])} to {when_text(ts[-1])}"
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


def pool_for(application: str) -> tuple[str, str] | None:
    name = application.lower()
    for fragments, pool, knob in POOLS:
        if any(f in name for f in fragments):
            return pool, knob
    return None


def group(records: Iterable[Record], *fields: str) -> dict[tuple[Any, ...], list[Record]]:
    out: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for r in records:
        out[tuple(r.get(f) for f in fields)].append(r)
    return out


# -- findings from the audit log alone ------------------------------------------------


def leak(target: str, records: Sequence[Record], window: Window) -> list[Finding]:
    """The application (and role) the watchdog keeps killing, against everyone else."""
    kills = kills_of(records)
    found = []
    for (app, role), mine in group(kills, "application_name", "usename").items():
        if len(mine) < MIN_KILLS or len(mine) / len(kills) < MIN_SHARE:
            continue
        mine_ids = {id(r) for r in mine}
        others = [r for r in kills if id(r) not in mine_ids]
        states = Counter(str(r.get("state")) for r in mine)
        clients = Counter(c for r in mine if (c := client_of(r)) is not None)
        evidence = [
            f"{rate_text(mine, window)}: {len(mine)} of the {len(kills)} kills on {target}"
            f" ({100 * len(mine) / len(kills):.0f}%)",
            f"state at kill: {top(states)}; {age_text(mine)}",
            f"everyone else: {len(others)} kills" + (f", {age_text(others)}" if others else ""),
        ]
        if len(clients) > 1 or through_pooler(mine):
            behind = " (real clients behind the pooler)" if through_pooler(mine) else ""
            evidence.append(f"from {len(clients)} client addresses{behind}: {top(clients)}")
        found.append(
            Finding("leak", "high", target, f"application '{app}' (role {role})",
                    tuple(evidence), tuple(_leak_fix(str(app), states)))
        )
    return found


def _leak_fix(app: str, states: Counter[str]) -> list[str]:
    fix = []
    if any(s in IIT for s in states):
        fix.append(
            f"In '{app}': end every transaction on every path (commit or rollback in a finally"
            " block or a context manager); a session left idle in transaction holds its locks"
            " and its slot."
        )
    known = pool_for(app)
    if known:
        fix.append(f"Let its pool ({known[0]}) retire and re-check connections: {known[1]}.")
    else:
        fix.append("Let its pool retire idle connections and check them before use:")
        fix += [f"  {pool}: {knob}" for _, pool, knob in POOLS]
    return fix


def nice_value(seconds: float) -> str:
    """A PostgreSQL duration literal at or above ``seconds``: 500ms, 30s, 5min."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 1)}ms"
    if seconds < 120:
        return f"{math.ceil(seconds)}s"
    return f"{math.ceil(seconds / 60)}min"


def analyse(
    config: Config,
    records: Sequence[Record],
    looks: Mapping[str, Any],
    window: Window,
    targets: Sequence[str],
    forecasts: Sequence[Record] = (),
) -> list[Finding]:
    """Every finding for ``targets``: ``looks`` maps a target to its advise_look.Look, or to
    None when it could not be reached (then only the audit log speaks for it); ``forecasts``
    are the exhaustion forecast's records (watchdog/forecast_log.py)."""
    from watchdog import advise_own as own
    from watchdog import advise_server as server
    from watchdog.advise_forecast import exhaustion_forecast

    policies = {p.name: p for p in config.policies}
    by_target = group(records, "target")
    found: list[Finding] = []
    for name in targets:
        mine = by_target.get((name,), [])
        found += leak(name, mine, window)
        found += exhaustion_forecast(name, forecasts, config)
        found += own.max_per_sweep(name, mine, config)
        found += own.dry_run_left_on(name, mine, config, window)
        found += own.policy_unused(name, mine, config, window)
        look = looks.get(name)
        if look is not None:
            found += server.timeouts(look, mine, policies, window)
            found += server.pooling(look)
            found += server.capacity(look)
            found += server.reserved_connections(look)
    return sort_findings(found)
