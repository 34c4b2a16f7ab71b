"""Where a leak comes from: an application's kills grouped by the shape of the last statement
each session ran before it went idle (pg_stat_activity's `query` in the audit record)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from watchdog.commands.advise.findings import Record
from watchdog.text.statements import shape

TOP = 3  # shapes named per application
SHOWN = 160  # characters of a shape printed


def shown(text: str) -> str:
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


def by_shape(kills: Sequence[Record]) -> list[tuple[str, Counter[str]]]:
    """(shape, states at kill) per statement shape, most kills first; kills without a
    statement are left out."""
    found: dict[str, Counter[str]] = defaultdict(Counter)
    for r in kills:
        s = shape(r.get("query"))
        if s is not None:
            found[s][str(r.get("state"))] += 1
    return sorted(found.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))


def _states(states: Counter[str]) -> str:
    if len(states) == 1:
        return next(iter(states))
    return " or ".join(f"{s} ({n})" for s, n in states.most_common())


def statement_evidence(who: str, kills: Sequence[Record]) -> list[str]:
    """The top shapes with their counts and the state at kill, e.g. "23 of 25 kills of
    billing-worker were idle in transaction after `SELECT … FOR UPDATE`"."""
    shapes = by_shape(kills)
    total = len(kills)
    lines = [
        f"{sum(states.values())} of {total} kills of {who} were {_states(states)}"
        f" after `{shown(s)}`"
        for s, states in shapes[:TOP]
    ]
    rest = shapes[TOP:]
    if rest:
        n = sum(sum(states.values()) for _, states in rest)
        lines.append(f"{n} more kills after {len(rest)} other statement shapes")
    missing = total - sum(sum(states.values()) for _, states in shapes)
    if missing:
        lines.append(f"{missing} of {total} kills have no statement in the audit log"
                     " (audit.query: omit)")
    return lines


def first_look(kills: Sequence[Record]) -> str | None:
    """Where to look first in the code: the statement most of the kills followed."""
    shapes = by_shape(kills)
    if not shapes:
        return None
    s, states = shapes[0]
    return (f"Look first at the code that runs `{shown(s)}`: {sum(states.values())} of"
            f" {len(kills)} kills came after it, so the session was left there.")
