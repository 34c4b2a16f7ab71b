"""`advise`: every finding for the targets asked, most important first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from watchdog.commands.advise import own, prepared, server, timeouts
from watchdog.commands.advise.findings import Finding, Record, Window, group, sort_findings
from watchdog.commands.advise.forecast import exhaustion_forecast
from watchdog.commands.advise.leak import leak
from watchdog.commands.advise.look import Look
from watchdog.config.policy import Config


def analyse(
    config: Config,
    records: Sequence[Record],
    looks: Mapping[str, Look | None],
    window: Window,
    targets: Sequence[str],
    forecasts: Sequence[Record] = (),
) -> list[Finding]:
    """Every finding for ``targets``: ``looks`` maps a target to its Look, or to None (or
    nothing) when it could not be reached (then only the audit log speaks for it);
    ``forecasts`` are the exhaustion forecast's records (watchdog/audit/forecast_log.py)."""
    policies = {p.name: p for p in config.policies}
    by_target = group(records, "target")
    found: list[Finding] = []
    for name in targets:
        mine = by_target.get((name,), [])
        found += leak(name, mine, window, policies)
        found += exhaustion_forecast(name, forecasts, config)
        found += own.max_per_sweep(name, mine, config)
        found += own.dry_run_left_on(name, mine, config, window)
        found += own.policy_unused(name, mine, config, window)
        look = looks.get(name)
        if look is not None:
            found += prepared.stale_prepared(look, config.alerts.prepared_older_than)
            found += timeouts.timeouts(look, mine, policies, window)
            found += timeouts.transaction_timeout(look, mine, policies, window)
            found += server.pooling(look)
            found += server.capacity(look)
            found += server.reserved_connections(look)
    return sort_findings(found)
