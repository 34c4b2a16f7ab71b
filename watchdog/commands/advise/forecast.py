"""`advise` finding from the exhaustion forecast's records: when a target came within
alerts.exhaustion_within, how fast it filled, who grew, and whether the slots ran out.

A pure function of the forecast records (watchdog/audit/forecast_log.py) and the config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from watchdog.commands.advise.findings import Finding, Record
from watchdog.config.policy import Config
from watchdog.config.units import format_duration, policy_duration

EPISODES_SHOWN = 3


def _growers(items: Any, quote: bool) -> str:
    if not isinstance(items, list):
        return ""
    shown = []
    for g in items[:3]:
        if isinstance(g, Mapping) and isinstance(g.get("per_min"), int | float):
            name = f"'{g.get('name')}'" if quote else str(g.get("name"))
            shown.append(f"{name} {float(g['per_min']):+g}/min")
    return ", ".join(shown)


def _num(r: Record, key: str) -> float | None:
    v = r.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _episodes(records: Sequence[Record]) -> list[tuple[Record, Record | None]]:
    """Each crossing with the record of its end (None: still on, or the service stopped)."""
    out: list[tuple[Record, Record | None]] = []
    for r in sorted(records, key=lambda r: str(r.get("ts"))):
        if r.get("event") == "crossed":
            out.append((r, None))
        elif r.get("event") == "ended" and out and out[-1][1] is None:
            out[-1] = (out[-1][0], r)
    return out


def _evidence(start: Record, end: Record | None) -> list[str]:
    used, cap, rate = start.get("used"), start.get("capacity"), _num(start, "rate_per_min")
    eta = _num(start, "eta_s")
    line = f"{start.get('ts')}: {used} of {cap} ordinary slots used"
    if rate is not None:
        line += f", filling at {rate:+g}/min"
    if eta is not None:
        line += f": full in ~{format_duration(eta)} at that rate"
    lines = [line]
    apps, clients = _growers(start.get("applications"), True), _growers(start.get("clients"), False)
    if apps or clients:
        behind = " (real clients behind the pooler)" if start.get("behind_pooler") else ""
        lines.append("  grew most: " + "; ".join(
            x for x in (apps, f"clients{behind} {clients}" if clients else "") if x))
    if end is None:
        lines.append("  no end recorded (the service stopped, or it is still filling)")
    else:
        full = _num(end, "full_after_s")
        peak = f"  then: peak {end.get('peak_used')} of {end.get('capacity')}"
        peak += f", every ordinary slot taken {format_duration(full)} after the forecast" \
            if full is not None else ", never full"
        duration = _num(end, "duration_s")
        lines.append(peak + (f"; re-armed {format_duration(duration)} later"
                             if duration is not None else ""))
    return lines


def exhaustion_forecast(target: str, records: Sequence[Record], config: Config) -> list[Finding]:
    """The times ``target``'s forecast fell within alerts.exhaustion_within, most recent first."""
    episodes = _episodes([r for r in records if r.get("target") == target])
    if not episodes:
        return []
    within = policy_duration(config.alerts.exhaustion_within)
    filled = [e for _, e in episodes if e is not None and _num(e, "full_after_s") is not None]
    evidence = [
        f"{len(episodes)} time{'s' if len(episodes) != 1 else ''} the forecast said the slots"
        f" would run out within alerts.exhaustion_within ({within}), from"
        f" {episodes[0][0].get('ts')} to {episodes[-1][0].get('ts')}; {len(filled)} of them"
        " filled every ordinary slot"
    ]
    for start, end in episodes[::-1][:EPISODES_SHOWN]:
        evidence += _evidence(start, end)
    top = next((g for s, _ in episodes[::-1] for g in (s.get("applications") or [])
                if isinstance(g, Mapping)), None)
    who = f"'{top.get('name')}'" if top else "the application that grew"
    fix = (
        f"Find what opens connections in {who} without closing them (its pool's maximum size,"
        " a connection per request or per thread, a leak on an error path) and cap its pool so"
        " the applications together stay under the ordinary slots.",
        "Until then, reclaim idle sessions sooner when the server is nearly full; first in the"
        " policy list:",
        "  - name: idle-when-full",
        "    state: idle",
        "    longer_than: 1m",
        "    when: {connections_above: 90%}",
        "Watch it fill, live: pg-watchdog status --watch 2",
    )
    severity = "high" if filled else "medium"
    return [Finding("exhaustion_forecast", severity, target, "connection slots running out",
                    tuple(evidence), fix)]
