"""The exhaustion forecast as `status` shows it: JSON-ready values and one line of text.

Application names and client addresses come from the watched server: the text goes through
review_render's escaping.
"""

from __future__ import annotations

from typing import Any

from watchdog.config.units import format_duration
from watchdog.core.forecast import WINDOWS, Forecast, Grower
from watchdog.text.fit import fit

Report = dict[str, Any]


def _safe(value: object, width: int) -> str:
    return fit(str(value), width)[0]


def growers_json(growers: tuple[Grower, ...]) -> list[Report]:
    """Each grower's name, rate per minute and count now."""
    return [{"name": g.name, "per_min": round(60 * g.rate, 1), "now": g.now} for g in growers]


def forecast_json(fc: Forecast | None) -> Report:
    """The exhaustion forecast: needs the history that only `--watch` (or the service) has."""
    if fc is None:
        return {"needs_history": True, "growing": False}
    return {
        "needs_history": False,
        "history_s": round(fc.history_s, 1),
        "growing": fc.growing,
        "eta_s": None if fc.eta_s is None else round(fc.eta_s, 1),
        "eta_slow_end_s": None if fc.slow_eta_s is None else round(fc.slow_eta_s, 1),
        "rate_per_min": round(60 * fc.rate, 1),
        "fitted_over_s": fc.window_s,
        "applications": growers_json(fc.applications),
        "clients": growers_json(fc.clients),
    }


def forecast_line(f: Report) -> str:
    """The forecast of :func:`forecast_json` in one line."""
    if f["needs_history"]:
        return ("one look shows no trend: `status --watch 2` gathers one; the service keeps"
                " its own (alerts, pg_watchdog_exhaustion_eta_seconds)")
    if not f["growing"]:
        need = WINDOWS[0] * 2  # a window and as long a baseline before it
        if f["history_s"] < need:
            return f"gathering history ({format_duration(f['history_s'])} of ~{need:.0f}s)"
        return f"not growing (history {format_duration(f['history_s'])})"
    grow = ", ".join(f"'{_safe(g['name'], 32)}' {g['per_min']:+g}/min" for g in f["applications"])
    clients = ", ".join(f"{_safe(g['name'], 46)} {g['per_min']:+g}/min" for g in f["clients"])
    return (
        f"slots run out in ~{format_duration(f['eta_s'])} at {f['rate_per_min']:+g}/min"
        f" (fitted over the last {format_duration(f['fitted_over_s'])})"
        + (f"; growing: {grow}" if grow else "") + (f"; clients: {clients}" if clients else "")
    )
