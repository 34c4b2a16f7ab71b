"""`advise` findings about the watchdog's own settings: the per-sweep cap, a dry run left on,
policies that never match. Pure functions of the audit records and the config.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from watchdog.commands.advise.findings import (
    Finding,
    Record,
    Window,
    kills_of,
    times,
)
from watchdog.config.policy import Config
from watchdog.core.model import KILLS
from watchdog.text import timestamps

DRY_RUN_DAYS = 3.0
UNUSED_AFTER_S = 86400.0  # a policy idle for less than a day says nothing yet


def max_per_sweep(target: str, records: Sequence[Record], config: Config) -> list[Finding]:
    """Sweeps that hit limits.max_per_sweep: the cap left matching sessions for later."""
    limit = config.limits.max_per_sweep
    per_sweep = Counter(str(r.get("sweep")) for r in records if r.get("outcome") in KILLS)
    full = [n for n in per_sweep.values() if n >= limit]
    if len(full) < 2:
        return []
    evidence = (
        f"{len(full)} of {len(per_sweep)} sweeps on {target} acted on limits.max_per_sweep ="
        f" {limit} sessions, so more matched than one sweep may end",
    )
    fix = (
        f"If the server fills faster than that, raise limits.max_per_sweep (e.g. to {2 * limit})"
        " or shorten the target's interval; the lasting cure is the leak itself.",
    )
    return [Finding("max_per_sweep", "medium", target, "limits.max_per_sweep", evidence, fix)]


def dry_run_left_on(
    target: str, records: Sequence[Record], config: Config, window: Window
) -> list[Finding]:
    """A dry run still on after days of would_* records."""
    dry = [p.name for p in config.policies if p.dry_run]
    if not (config.dry_run or dry):
        return []
    ts = times(r for r in records if str(r.get("outcome", "")).startswith("would_"))
    if not ts or (window.now - ts[0]).total_seconds() < DRY_RUN_DAYS * 86400:
        return []
    where = "dry_run: true at the top" if config.dry_run else f"dry_run on {', '.join(dry)}"
    days = (window.now - ts[0]).total_seconds() / 86400
    evidence = (
        f"{where}; {len(ts)} would_* records on {target} since {timestamps.shown(ts[0])}"
        f" ({days:.0f} days)",
    )
    fix = ("Review them (pg-watchdog audit --outcome would_terminate), then set dry_run: false.",)
    return [Finding("dry_run_left_on", "medium", target, "dry run", evidence, fix)]


def policy_unused(
    target: str, records: Sequence[Record], config: Config, window: Window
) -> list[Finding]:
    """Policies that never matched while others did, over at least a day."""
    if window.seconds < UNUSED_AFTER_S or not kills_of(records):
        return []
    used = {r.get("policy") for r in records}
    found = []
    for p in config.policies:
        if (p.targets is None or target in p.targets) and p.name not in used:
            evidence = (
                f"no record of policy {p.name} on {target} in {window.text()},"
                f" while {len(kills_of(records))} sessions were ended by the others",
            )
            fix = (
                f"Check that policy {p.name} still matches what you expect (state, filters,"
                " threshold, order: an earlier policy claims a session first); remove it if not.",
            )
            found.append(Finding("policy_unused", "low", target, f"policy {p.name}",
                                 evidence, fix))
    return found
