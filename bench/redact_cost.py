"""Redaction cost: watchdog.text.redact.redact on realistic statements and on hostile megabytes.

Each input is redacted --runs times (median printed), then its output once more (the second
pass of an idempotent function). Sizes: a 1 kB statement (track_activity_query_size's
default keeps at most that much), and 100 kB and 1 MB (its maximum) of each hostile shape;
time per MB should stay flat between 100 kB and 1 MB: the scanner is linear.

    .venv/bin/python bench/redact_cost.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

from benchlib import table

from watchdog.text.redact import redact

REALISTIC = (
    "SELECT o.id, o.total, c.email FROM orders o JOIN customers c ON c.id = o.customer_id"
    " WHERE o.created_at > '2026-11-01' AND o.status IN ('paid', 'shipped') AND c.card ="
    " '4111111111111111' /* app=web,route=/orders */ ORDER BY o.id LIMIT 50;\n"
)
SHAPES: dict[str, Callable[[int], str]] = {
    "realistic statements": lambda n: (REALISTIC * (n // len(REALISTIC) + 1))[:n],
    "numbers 1,1,1,...": lambda n: "1," * (n // 2),
    "strings '',x": lambda n: "'',x" * (n // 4),
    "names and newlines": lambda n: "a\n" * (n // 2),
    "open parens": lambda n: "(" * n,
    "nested comment openers": lambda n: "/*" * (n // 2),
    "dollar tags $a$": lambda n: "$a$" * (n // 3),
    "E'\\ escapes": lambda n: "E'\\" * (n // 3),
    "both readings a'b'\\": lambda n: "a'b'\\" * (n // 5),
    "PASSWORD PASSWORD ...": lambda n: "ALTER ROLE x" + " PASSWORD" * (n // 9),
}


def timed(text: str, runs: int) -> tuple[float, str]:
    samples, out = [], ""
    for _ in range(runs):
        started = time.perf_counter()
        out = redact(text)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: nproc {os.cpu_count()}, Python {platform.python_version()}, load avg {load}")
    ms = timed(SHAPES["realistic statements"](1024), args.runs * 200)[0] * 1000
    hostile = max(timed(make(1024), args.runs * 200)[0] for make in SHAPES.values()) * 1000
    print(f"1 kB (track_activity_query_size's default): {ms:.3f} ms realistic,"
          f" {hostile:.3f} ms for the slowest hostile shape")
    rows = []
    for name, make in SHAPES.items():
        row: list[object] = [name]
        for size in (100_000, 1_000_000):
            seconds, out = timed(make(size), args.runs)
            row.append(f"{seconds / size * 1e6:.2f}")
        row.append(f"{timed(out, 1)[0]:.2f}")
        rows.append(row)
    print("seconds per MB at 100 kB and at 1 MB, and seconds to redact the 1 MB result again:")
    print(table(["input", "100 kB", "1 MB", "again"], rows))


if __name__ == "__main__":
    main()
