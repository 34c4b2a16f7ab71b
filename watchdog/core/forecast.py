"""The forecast of connection exhaustion: a short history of client counts, and a robust fit.

Pure: the caller feeds samples (with its own monotonic clock) and reads estimates.

The fit is Theil-Sen, the median of the slopes between every pair of samples: half the samples
may be outliers (a burst of connections, a mass kill) before it moves, where least squares
follows any one of them. Its confidence interval (Sen's, from Kendall's S, corrected for ties,
which integer counts are full of, and for serial correlation, since counts that wander for a
minute are far from independent) gives a slow end of the rate. Several trailing windows are
fitted, so a leak that began twenty seconds ago is seen at its own rate, not averaged away by
the quiet minutes before it; the window that runs the slots out soonest at its slow end wins.

A window counts only if its slow end climbs whole connections (MIN_RISE), more than the counts
ever climbed over as long a span in the history before it, to a level they never reached
there: a server that swings between 75 % and 90 % all day does that every hour, a leak never.
"""

from __future__ import annotations

import math
import sys
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from watchdog.core.clients import real_addr
from watchdog.core.model import Snapshot

SAMPLE_EVERY = 1.0  # s: sweeps come every 250 ms near thresholds; the history is by time
HISTORY = 600.0  # s of samples kept: each window is judged against the one before it
WINDOWS = (10.0, 20.0, 40.0, 80.0, 160.0, 300.0)  # trailing windows fitted, in seconds
MIN_GAP = 0.9 * SAMPLE_EVERY  # sweeps 1 s apart come a few ms early or late
MIN_SAMPLES = 8  # fewer cannot show a trend at Z, even rising at every sample
MIN_COVER = 0.5  # a window's samples must span at least this share of it
MAX_POINTS = 40  # per fit, thinned evenly: 780 pairs, well under a millisecond
MAX_R1 = 0.9  # lag-1 autocorrelation counted at most (variance x 19)
Z = 3.09  # one-sided 99.9 %: the slow end of the slope's confidence interval
MIN_RISE = 3.0  # slots the slow end must climb over the window: noise never does
KEEP_NAMES = 50  # applications (and clients) kept per sample, the largest counts
SHOWN = 5  # growers reported
REARM_FACTOR = 1.5  # re-armed once the slow-end estimate is past 1.5 x the window ...
REARM_AFTER = 60.0  # ... (or nothing grows) for this long: one event per crossing


@dataclass(frozen=True)
class Sample:
    """Client counts at one moment: all of them, per application, per (real) client."""

    t: float  # monotonic seconds
    used: int
    capacity: int
    apps: Mapping[str, int] = field(default_factory=dict)
    clients: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Fit:
    """A Theil-Sen slope (per second) and the slow end of its confidence interval."""

    slope: float
    lower: float
    n: int
    span: float


@dataclass(frozen=True)
class Grower:
    """An application or client whose count grows: its rate (per second) and count now."""

    name: str
    rate: float
    now: int


@dataclass(frozen=True)
class Forecast:
    """What the history says now; ``eta_s`` None when the counts are not growing."""

    used: int
    capacity: int
    history_s: float  # how much history there is
    samples: int
    eta_s: float | None = None  # at the fitted rate
    slow_eta_s: float | None = None  # at the slow end of the rate's confidence interval
    rate: float = 0.0  # client connections per second, fitted
    window_s: float = 0.0  # the trailing window the estimate comes from
    applications: tuple[Grower, ...] = ()
    clients: tuple[Grower, ...] = ()

    @property
    def growing(self) -> bool:
        return self.eta_s is not None

    def within(self, horizon: float) -> bool:
        """Whether the slots run out within ``horizon`` s even at the slow end of the rate."""
        return self.slow_eta_s is not None and self.slow_eta_s <= horizon


def _top(counts: Counter[str]) -> dict[str, int]:
    # Interned: every sample of a target names the same few applications and clients.
    return {sys.intern(name): n for name, n in counts.most_common(KEEP_NAMES)}


def make_sample(t: float, used: int, capacity: int, apps: Iterable[str],
                clients: Iterable[str]) -> Sample:
    """A sample from one look: ``apps`` and ``clients`` name each client session's."""
    return Sample(t, used, capacity, _top(Counter(apps)), _top(Counter(clients)))


def sample_of(snapshot: Snapshot, t: float) -> Sample:
    """The sample of one snapshot: the one definition of used slots, and behind a pooler the
    real client of each backend (its own address otherwise; "local" for a Unix socket)."""
    clients = snapshot.clients
    return make_sample(
        t, snapshot.used, snapshot.capacity, (s.application_name for s in clients),
        (real_addr(s, snapshot.pooled.get(s.pid)) or "local" for s in clients),
    )


def theil_sen(ts: Sequence[float], ys: Sequence[float], z: float = Z) -> Fit | None:
    """The median pairwise slope and its lower confidence bound (Sen 1968, ties corrected).

    ``ts`` strictly increasing. None with fewer than two points.
    """
    n = len(ts)
    slopes = sorted(
        (ys[j] - ys[i]) / (ts[j] - ts[i]) for i in range(n) for j in range(i + 1, n)
    )
    if not slopes:
        return None
    m = len(slopes)
    mid = m // 2
    slope = slopes[mid] if m % 2 else (slopes[mid - 1] + slopes[mid]) / 2
    # Kendall's S variance; tied counts (the usual case for integers) shrink it.
    ties = sum(k * (k - 1) * (2 * k + 5) for k in Counter(ys).values())
    var = (n * (n - 1) * (2 * n + 5) - ties) / 18 * _serial_factor(ts, ys, slope)
    rank = math.floor((m - z * math.sqrt(max(var, 0.0))) / 2)  # 1-based rank of the bound
    lower = slopes[rank - 1] if rank >= 1 else -math.inf
    return Fit(slope, lower, n, ts[-1] - ts[0])


def _usual_rise(prior: Sequence[Sample], span: float) -> float:
    """The largest rise the counts made over ``span`` seconds before: a wandering server climbs
    and falls back all day; a leak climbs as it never did."""
    most, a = 0.0, 0
    for b in range(len(prior)):
        while prior[b].t - prior[a].t > span:
            a += 1
        most = max(most, float(prior[b].used - prior[a].used))
    return most


def _serial_factor(ts: Sequence[float], ys: Sequence[float], slope: float) -> float:
    """How much serial correlation inflates the variance: (1 + r1) / (1 - r1), r1 the lag-1
    autocorrelation of the residuals about the fit (0 <= r1 <= MAX_R1).

    Connection counts wander: a pool that grows for a minute and shrinks the next is no
    trend, but its samples are far from independent, and Kendall's variance assumes they are.
    """
    res = [y - slope * t for t, y in zip(ts, ys, strict=True)]
    mean = sum(res) / len(res)
    res = [r - mean for r in res]
    denom = sum(r * r for r in res)
    if denom <= 0:
        return 1.0
    r1 = sum(a * b for a, b in pairwise(res)) / denom
    r1 = min(max(r1, 0.0), MAX_R1)
    return (1 + r1) / (1 - r1)


def _time(sample: Sample) -> float:
    return sample.t


def _thin(samples: Sequence[Sample], limit: int = MAX_POINTS) -> list[Sample]:
    if len(samples) <= limit:
        return list(samples)
    step = (len(samples) - 1) / (limit - 1)
    return [samples[round(i * step)] for i in range(limit)]


def _growers(points: Sequence[Sample], key: str) -> tuple[Grower, ...]:
    ts = [p.t for p in points]
    first: Mapping[str, int] = getattr(points[0], key)
    last: Mapping[str, int] = getattr(points[-1], key)
    found = []
    for name, now in last.items():
        if now <= first.get(name, 0):
            continue  # not up over the window: no need to fit it
        fit = theil_sen(ts, [getattr(p, key).get(name, 0) for p in points])
        if fit is not None and fit.slope > 0:
            found.append(Grower(name, fit.slope, now))
    found.sort(key=lambda g: (-g.rate, g.name))
    return tuple(found[:SHOWN])


class History:
    """One target's recent samples, at most one per SAMPLE_EVERY seconds."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []  # oldest first; times strictly increasing

    def observe(self, sample: Sample) -> bool:
        """Keep ``sample`` unless the last one is younger than SAMPLE_EVERY; whether kept."""
        if self.samples and sample.t - self.samples[-1].t < MIN_GAP:
            return False  # also a clock that went back: never a pair with dt <= 0
        self.samples.append(sample)
        old = bisect_left(self.samples, sample.t - HISTORY, key=_time)
        if old:
            del self.samples[:old]
        return True

    def forecast(self, baseline_from: float = -math.inf) -> Forecast | None:
        """The estimate from the samples so far; None before the first sample.

        Only samples from ``baseline_from`` on serve as the baseline a rise is judged against:
        the last alert's climb and plateau are no measure of how this server usually moves.
        """
        if not self.samples:
            return None
        last = self.samples[-1]
        base = Forecast(last.used, last.capacity, last.t - self.samples[0].t, len(self.samples))
        remaining = max(last.capacity - last.used, 0)
        best: tuple[float, float, Fit, list[Sample]] | None = None
        samples = self.samples
        base_at = bisect_left(samples, baseline_from, key=_time)
        for window in WINDOWS:
            at = bisect_left(samples, last.t - window, key=_time)
            inside = samples[at:]
            if len(inside) < MIN_SAMPLES or inside[-1].t - inside[0].t < MIN_COVER * window:
                continue
            prior = samples[base_at:at]
            if not prior or inside[0].t - prior[0].t < window:
                continue  # no baseline as long as the window to judge its rise against
            if last.used <= max(s.used for s in prior):
                continue  # not above what it reached before: the usual case, and cheap
            points = _thin(inside)
            fit = theil_sen([p.t for p in points], [p.used for p in points])
            if fit is None or fit.lower <= 0:
                continue
            if fit.lower * fit.span < max(MIN_RISE, _usual_rise(prior, fit.span)):
                continue
            slow = remaining / fit.lower
            if best is None or slow < best[0]:
                best = (slow, window, fit, points)
        if best is None:
            return base
        slow, window, fit, points = best
        return Forecast(
            last.used, last.capacity, base.history_s, base.samples,
            eta_s=remaining / fit.slope, slow_eta_s=slow, rate=fit.slope, window_s=window,
            applications=_growers(points, "apps"), clients=_growers(points, "clients"),
        )


@dataclass
class Episode:
    """A crossing into the forecast window, from its alert until the forecast is re-armed."""

    start: Forecast  # at the crossing
    peak_used: int
    full_after_s: float | None = None  # from the crossing to the first look with no slot left
    soonest_eta_s: float | None = None
    duration_s: float = 0.0


class Crossing:
    """One event per crossing: armed until the forecast falls within the window; re-armed only
    after it has stayed past REARM_FACTOR x the window (or not growing, and not full) for
    REARM_AFTER seconds, so a forecast that hovers at the edge does not alert again and again.
    """

    def __init__(self) -> None:
        self.episode: Episode | None = None
        self.rearmed_at = -math.inf  # when the last episode ended: the baseline starts there
        self._since = 0.0
        self._calm_since: float | None = None

    def step(self, fc: Forecast, now: float, horizon: float) -> tuple[str, Episode] | None:
        """("crossed", episode) when an alert is due, ("cleared", episode) when re-armed."""
        ep = self.episode
        if ep is None:
            if not fc.within(horizon):
                return None
            self.episode = ep = Episode(fc, fc.used, 0.0 if fc.used >= fc.capacity else None,
                                        fc.eta_s)
            self._since, self._calm_since = now, None
            return "crossed", ep
        ep.peak_used = max(ep.peak_used, fc.used)
        ep.duration_s = now - self._since
        if fc.used >= fc.capacity and ep.full_after_s is None:
            ep.full_after_s = now - self._since
        if fc.eta_s is not None:
            ep.soonest_eta_s = min(fc.eta_s, ep.soonest_eta_s or fc.eta_s)
        calm = fc.slow_eta_s is None or fc.slow_eta_s > REARM_FACTOR * horizon
        if not calm or fc.used >= fc.capacity:
            self._calm_since = None
            return None
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since < REARM_AFTER:
            return None
        self.episode = None
        self.rearmed_at = now
        return "cleared", ep
