"""Parsing of the human units used in the policy file: durations and percentages."""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``500ms``, ``1h30m`` or ``2d``; ValueError if malformed."""
    s = text.strip()
    pos = 0
    total = 0.0
    last = float("inf")
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        # Units go from the largest to the smallest, each once: "30m1h" is a typo.
        if m is None or _UNIT_SECONDS[m.group(2)] >= last:
            raise ValueError(f"{text!r} is not a duration (e.g. 30s, 10m, 1h30m)")
        last = _UNIT_SECONDS[m.group(2)]
        total += float(m.group(1)) * last
        pos = m.end()
    if not s:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 10m, 1h30m)")
    return total


def parse_percent(text: str) -> float:
    """The fraction in a percentage such as ``80%``; ValueError unless 0 < value <= 100."""
    m = _PERCENT.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a percentage (e.g. 80%)")
    value = float(m.group(1))
    if not 0 < value <= 100:
        raise ValueError(f"{text!r} must be above 0% and at most 100%")
    return value / 100.0


def format_duration(seconds: float) -> str:
    """A compact human form of a duration: ``950ms``, ``42s``, ``5m03s``, ``1h02m``, ``3d04h``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def policy_duration(seconds: float) -> str:
    """``seconds`` as the policy file writes a duration (``10m``, ``1m36s``, ``500ms``)."""
    ms = round(seconds * 1000)
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    return "".join(parts) + (f"{ms}ms" if ms or not parts else "")
