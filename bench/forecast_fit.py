"""The exhaustion forecast on simulated client counts (one sample a second, as a target swept
every second): how early leaks are seen, how often steady and wandering servers alert, and
what one estimate costs. Pure: no server.

    .venv/bin/python bench/forecast_fit.py [--hours 10]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import tracemalloc
from collections.abc import Callable

from watchdog.core.forecast import HISTORY, Crossing, History, make_sample

WITHIN = 600.0


def crossings(series: list[int], capacity: int) -> list[float]:
    history, crossing, found = History(), Crossing(), []
    for i, used in enumerate(series):
        history.observe(make_sample(float(i), used, capacity, ["app"] * used, []))
        fc = history.forecast(crossing.rearmed_at)
        assert fc is not None
        step = crossing.step(fc, float(i), WITHIN)
        if step is not None and step[0] == "crossed":
            found.append(float(i))
    return found


def ar1(level: float, sigma: float, phi: float, n: int, capacity: int,
        rng: random.Random) -> list[int]:
    x, out, sd = 0.0, [], sigma * math.sqrt(1 - phi * phi)
    for _ in range(n):
        x = phi * x + rng.gauss(0, sd)
        out.append(max(0, min(capacity, round(level + x))))
    return out


def leaks() -> None:
    print("leak after 10 quiet minutes at 60 of 100 slots: seconds from its start to the alert,"
          " and lead before the first refusal")
    for per_min in (1, 2, 5, 10, 20, 60, 120):
        series = [60] * 600 + [min(100, 60 + (i * per_min) // 60) for i in range(4000)]
        full = series.index(100)
        found = crossings(series, 100)
        if found:
            print(f"  {per_min:4d}/min: alert {found[0] - 600:5.0f}s after it began,"
                  f" {full - found[0]:5.0f}s before full")
        else:
            print(f"  {per_min:4d}/min: no alert ({full - 600}s to full)")


def false_alarms(hours: float) -> None:
    n = int(hours * 3600)
    cases: list[tuple[str, int, Callable[[random.Random], list[int]]]] = [
        ("82% of 100, independent +-2", 100,
         lambda r: [82 + r.randint(-2, 2) for _ in range(n)]),
        ("85% of 57, independent +-1", 57, lambda r: [48 + r.randint(-1, 1) for _ in range(n)]),
        ("82% of 100 wandering, sd 2, phi 0.9", 100, lambda r: ar1(82, 2, 0.9, n, 100, r)),
        ("82% of 100 wandering, sd 3, phi 0.9", 100, lambda r: ar1(82, 3, 0.9, n, 100, r)),
        ("82% of 100 wandering, sd 3, phi 0.98", 100, lambda r: ar1(82, 3, 0.98, n, 100, r)),
        ("84% of 57 wandering, sd 2, phi 0.98", 57, lambda r: ar1(48, 2, 0.98, n, 57, r)),
    ]
    print(f"steady servers, {hours:g} simulated hours each: alerts (after the first"
          f" {HISTORY:.0f}s / in the first {HISTORY:.0f}s)")
    for name, cap, make in cases:
        found = crossings(make(random.Random(42)), cap)
        late = sum(1 for t in found if t >= HISTORY)
        print(f"  {name:40s} {late:3d} / {len(found) - late}")
    starts = 40
    early = sum(len(crossings(ar1(82, 2, 0.9, int(HISTORY), 100, random.Random(s)), 100))
                for s in range(starts))
    print(f"  first {HISTORY:.0f}s of {starts} starts, wandering sd 2 phi 0.9: {early} alerts")


def cost() -> None:
    history = History()
    rng = random.Random(1)
    tracemalloc.start()
    for i in range(int(HISTORY) + 1):
        apps = [f"app-{rng.randint(0, 19)}" for _ in range(60)]
        history.observe(make_sample(float(i), 60, 100, apps, [f"10.0.0.{j}" for j in range(10)]))
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    runs = 200
    started = time.perf_counter()
    for _ in range(runs):
        history.forecast()
    flat = (time.perf_counter() - started) / runs * 1000
    rising = History()
    for i in range(int(HISTORY) + 1):
        rising.observe(make_sample(float(i), i // 10, 100, [], []))
    started = time.perf_counter()
    for _ in range(runs):
        rising.forecast()
    fit = (time.perf_counter() - started) / runs * 1000
    print(f"one estimate over {len(history.samples)} samples: {flat:.2f} ms when no window is"
          f" above its past (the usual case), {fit:.2f} ms when every window is fitted;"
          f" history of 20 applications and 10 clients: {size / 1024:.0f} KiB")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hours", type=float, default=10.0, help="simulated hours per steady case")
    args = p.parse_args(argv)
    leaks()
    false_alarms(args.hours)
    cost()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
