"""The exhaustion forecast's fit and crossing logic (watchdog/core/forecast.py): pure, fast, seeded.

Series are sampled once a second, as the service samples a target swept every second.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from watchdog.core.forecast import (
    HISTORY,
    REARM_AFTER,
    Crossing,
    Forecast,
    History,
    make_sample,
    sample_of,
    theil_sen,
)
from watchdog.core.model import CLIENT_BACKEND, PoolerClient, PoolerLink, Session, Snapshot

WITHIN = 600.0


def replay(series: Sequence[int], capacity: int, apps: Sequence[dict[str, int]] | None = None,
           within: float = WITHIN) -> list[tuple[float, str, Forecast]]:
    """Feed one sample a second; every crossing step with its time and forecast."""
    history, crossing, steps = History(), Crossing(), []
    for i, used in enumerate(series):
        counts = apps[i] if apps else {"app": used}
        names = [name for name, n in counts.items() for _ in range(n)]
        history.observe(make_sample(float(i), used, capacity, names, []))
        fc = history.forecast(crossing.rearmed_at)
        assert fc is not None
        step = crossing.step(fc, float(i), within)
        if step is not None:
            steps.append((float(i), step[0], fc))
    return steps


def crossings(steps: list[tuple[float, str, Forecast]]) -> list[tuple[float, str, Forecast]]:
    return [s for s in steps if s[1] == "crossed"]


def ar1(level: float, sigma: float, phi: float, n: int, capacity: int, seed: int) -> list[int]:
    """Counts that wander around ``level`` (an AR(1) process), as a busy steady server's do."""
    rng = random.Random(seed)
    x, out = 0.0, []
    sd = sigma * math.sqrt(1 - phi * phi)
    for _ in range(n):
        x = phi * x + rng.gauss(0, sd)
        out.append(max(0, min(capacity, round(level + x))))
    return out


# -- the fit ---------------------------------------------------------------------------


def test_theil_sen_finds_the_slope_of_a_line() -> None:
    ts = [float(i) for i in range(20)]
    fit = theil_sen(ts, [5 + 2 * t for t in ts])
    assert fit is not None
    assert fit.slope == pytest.approx(2.0)
    assert 0 < fit.lower <= fit.slope


def test_theil_sen_ignores_a_quarter_of_wild_outliers() -> None:
    rng = random.Random(7)
    ts = [float(i) for i in range(40)]
    ys = [10 + 0.5 * t for t in ts]
    for i in rng.sample(range(40), 10):
        ys[i] += rng.choice([-30, 45])
    fit = theil_sen(ts, ys)
    assert fit is not None
    assert fit.slope == pytest.approx(0.5, abs=0.1)


def test_a_flat_series_has_no_positive_lower_bound() -> None:
    ts = [float(i) for i in range(30)]
    fit = theil_sen(ts, [48.0] * 30)
    assert fit is not None
    assert fit.slope == 0 and fit.lower <= 0


def test_too_few_points_to_fit() -> None:
    assert theil_sen([1.0], [3.0]) is None


# -- leaks are forecast before the slots run out -----------------------------------------


def test_a_leak_after_quiet_minutes_is_seen_at_its_own_rate() -> None:
    # Five quiet minutes at 5 used, then 2 connections a second toward 57 ordinary slots.
    series = [5] * 300 + [min(5 + 2 * k, 57) for k in range(1, 40)] + [57] * 120
    full_at = series.index(57)
    found = crossings(replay(series, 57))
    assert len(found) == 1
    t, _, fc = found[0]
    assert t < full_at - 10, "the alert leaves time to act"
    assert fc.rate == pytest.approx(2.0, rel=0.25)
    assert fc.eta_s is not None and fc.eta_s < 40
    assert fc.window_s <= 20


@pytest.mark.parametrize("per_min", [5, 10, 20, 60])
def test_leaks_of_a_few_to_sixty_slots_a_minute_alert_before_the_server_is_full(
        per_min: int) -> None:
    series = [60] * 600 + [min(100, 60 + (i * per_min) // 60) for i in range(3000)]
    found = crossings(replay(series, 100))
    assert found, f"a leak of {per_min}/min was not forecast"
    assert found[0][0] < series.index(100)


def test_the_growing_application_is_named_with_its_rate() -> None:
    n = 400
    apps = [{"web": 20, "leaky": 0 if i < 300 else min((i - 300) * 2, 30), "batch": 5}
            for i in range(n)]
    series = [sum(a.values()) for a in apps]
    found = crossings(replay(series, 57, apps))
    assert found
    growers = found[0][2].applications
    assert [g.name for g in growers] == ["leaky"]
    assert 60 * growers[0].rate == pytest.approx(120, rel=0.3)


# -- a steady server raises nothing ----------------------------------------------------


def test_a_server_steady_at_82_percent_for_an_hour_raises_nothing() -> None:
    rng = random.Random(11)
    series = [82 + rng.randint(-2, 2) for _ in range(3600)]
    assert crossings(replay(series, 100)) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_server_wandering_around_82_percent_raises_nothing_once_watched_a_while(
        seed: int) -> None:
    # A busy server's count wanders (each second depends on the last): 82 % of 100, +-2.
    # In its first minutes the forecast has little history to judge a new high against
    # (bench/forecast_fit.py counts how often that alerts: about 1 start in 40).
    series = ar1(82, 2.0, 0.9, 3600, 100, seed)
    assert [t for t, *_ in crossings(replay(series, 100)) if t >= HISTORY] == []


def test_a_burst_that_stays_flat_is_no_trend() -> None:
    series = [20] * 120 + [35] * 10 + [20] * 120 + [40] * 120
    assert crossings(replay(series, 57)) == []


def test_nothing_is_forecast_without_a_baseline_as_long_as_the_window() -> None:
    # The watchdog starts in the middle of a rise: no history before it to judge it against.
    history = History()
    for i in range(12):
        history.observe(make_sample(float(i), 5 + 2 * i, 57, [], []))
    fc = history.forecast()
    assert fc is not None and not fc.growing


# -- sampling and crossings ---------------------------------------------------------------


def test_history_is_sampled_by_time_not_per_sweep() -> None:
    history = History()
    kept = [history.observe(make_sample(i * 0.25, 10, 57, [], [])) for i in range(40)]
    assert sum(kept) == 10  # sweeps every 250 ms: one sample a second
    assert not history.observe(make_sample(5.0, 10, 57, [], []))  # a clock that went back


def test_history_keeps_a_bounded_span() -> None:
    history = History()
    for i in range(int(HISTORY) * 3):
        history.observe(make_sample(float(i), 10, 57, [], []))
    span = history.samples[-1].t - history.samples[0].t
    assert span <= HISTORY


def test_one_event_per_crossing_and_rearmed_after_calm() -> None:
    leak = [min(5 + 2 * k, 57) for k in range(1, 40)]
    # Leak to full, stay full 3 minutes, drop back, calm 5 minutes, leak again.
    series = [5] * 60 + leak + [57] * 180 + [5] * 300 + leak + [57] * 30
    steps = replay(series, 57)
    kinds = [kind for _, kind, _ in steps]
    assert kinds == ["crossed", "cleared", "crossed"]
    cleared_at = steps[1][0]
    assert cleared_at >= 60 + len(leak) + 180 + REARM_AFTER


def test_an_estimate_hovering_at_the_window_edge_alerts_once() -> None:
    # Slow growth whose slow-end estimate wobbles around the window: no new event per wobble.
    series = [60] * 600 + [min(100, 60 + i // 12) for i in range(2400)]
    assert len(crossings(replay(series, 100))) == 1


def test_within_uses_the_slow_end_of_the_rate() -> None:
    fc = Forecast(50, 57, 100.0, 100, eta_s=100.0, slow_eta_s=700.0, rate=0.07)
    assert fc.growing and not fc.within(600)
    assert fc.within(800)
    assert not Forecast(50, 57, 100.0, 100).within(600)


# -- a sample from a snapshot -------------------------------------------------------------


def _session(pid: int, app: str, addr: str | None, backend_type: str = CLIENT_BACKEND) -> Session:
    return Session(pid, backend_type, None, "app", False, "db", app, addr, "idle", None, None,
                   None, None)


def test_a_sample_counts_used_slots_as_the_snapshot_does_and_real_clients_behind_a_pooler(
) -> None:
    sessions = (
        _session(1, "web", "10.0.0.5"),
        _session(2, "web", "10.0.0.9"),  # the pooler's address; its real client is known
        _session(3, "pg-watchdog", None),
        _session(4, "", None, "autovacuum launcher"),
    )
    link = PoolerLink("pgb1", PoolerClient("192.0.2.7", 40000, "app", "db", "web", None))
    snap = Snapshot(datetime.now(UTC), 3, 180000, 60, 3, 0, sessions, pooled={2: link})
    sample = sample_of(snap, 1.0)
    assert sample.used == snap.used == 3
    assert sample.capacity == snap.capacity == 57
    assert sample.apps == {"web": 2, "pg-watchdog": 1}
    assert sample.clients == {"10.0.0.5": 1, "192.0.2.7": 1, "local": 1}

