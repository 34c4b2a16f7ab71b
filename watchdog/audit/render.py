"""Rendering audit records for people: a terminal-safe aligned table, summaries, JSON lines.

Audit values come from the sessions being watched: an application_name can hold
newlines, tabs or terminal escape sequences. Nothing here writes such a
character raw to the terminal; it is shown escaped (``\\n``, ``\\x1b``) instead.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from watchdog.config.units import format_duration
from watchdog.text import timestamps
from watchdog.text.escape import json_line
from watchdog.text.fit import fit
from watchdog.text.statements import shape

_CANONICAL_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z")
_BATCH = 1000


@dataclass(frozen=True)
class _Column:
    title: str
    cap: int  # never wider than this
    floor: int  # at least this wide once the output outgrows the first batch
    right: bool = False


_COLUMNS = (
    _Column("TIME", 20, 20),
    _Column("TARGET", 24, 12),
    _Column("POLICY", 32, 20),
    _Column("OUTCOME", 15, 15),
    _Column("PID", 10, 7, right=True),
    _Column("USER", 24, 12),
    _Column("APP", 32, 20),
    _Column("DB", 24, 12),
    _Column("CLIENT", 39, 15),
    _Column("AGE", 8, 6, right=True),
)
_RIGHT = tuple(col.right for col in _COLUMNS)


def record_time(value: object) -> datetime | None:
    """The aware UTC datetime of an audit ``ts`` value, or None when it is not one."""
    return timestamps.parse(value)


def write_json_lines(records: Iterable[object], out: TextIO) -> None:
    it = iter(records)
    while chunk := [json_line(rec) for rec in itertools.islice(it, _BATCH)]:
        out.write("\n".join(chunk) + "\n")


def human_age(value: object) -> str:
    """Seconds as 42s, 5m03s, 1h02m, 2d03h."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    if not math.isfinite(value) or value < 0:
        return ""
    seconds = int(value)
    # Whole seconds in the table; past a minute, the same form as everywhere else.
    return f"{seconds}s" if seconds < 60 else format_duration(seconds)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _when_text(value: object) -> str:
    if isinstance(value, str) and _CANONICAL_TS.fullmatch(value):
        return value[:19] + "Z"
    when = record_time(value)
    return timestamps.shown(when) if when else _text(value)


def _row(rec: Mapping[str, Any]) -> tuple[str, ...]:
    client = rec.get("client_addr")
    return (
        _when_text(rec.get("ts")),
        _text(rec.get("target")),
        _text(rec.get("policy")),
        _text(rec.get("outcome")),
        _text(rec.get("pid")),
        _text(rec.get("usename")),
        _text(rec.get("application_name")),
        _text(rec.get("datname")),
        "[local]" if client is None else _text(client),  # NULL client_addr: Unix socket
        human_age(rec.get("age_s")),
    )


def _line(cells: Iterable[str], widths: list[int]) -> str:
    parts = []
    for cell, width, right in zip(cells, widths, _RIGHT, strict=True):
        shown, used = fit(cell, width)
        padded = width - used + len(shown)
        parts.append(shown.rjust(padded) if right else shown.ljust(padded))
    return "  ".join(parts).rstrip() + "\n"


def write_table(records: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    """Stream `records` as an aligned table; widths come from the first rows. Returns the count."""
    it = iter(records)
    head = [_row(rec) for rec in itertools.islice(it, _BATCH)]
    if not head:
        return 0
    widths = []
    for i, col in enumerate(_COLUMNS):
        width = max(fit(row[i], col.cap)[1] for row in head)
        if len(head) == _BATCH:
            width = max(width, col.floor)
        widths.append(min(col.cap, max(width, len(col.title))))
    out.write(_line((c.title for c in _COLUMNS), widths))
    out.write("".join(_line(row, widths) for row in head))
    count = len(head)
    while chunk := [_row(rec) for rec in itertools.islice(it, _BATCH)]:
        out.write("".join(_line(row, widths) for row in chunk))
        count += len(chunk)
    return count


_SUMMARY_FIELDS = (
    ("policy", "policy"),
    ("user", "usename"),
    ("application", "application_name"),
    ("outcome", "outcome"),
    ("client", ""),  # computed: record_client()
    ("statement", ""),  # computed: the shape of the last statement (statements.shape)
)
_WIDTH = {"statement": 160}  # columns of a key shown; 64 for the others


def record_client(rec: Mapping[str, Any]) -> str | None:
    """The address of the application behind a record: its pooler client's, else client_addr."""
    pc = rec.get("pooler_client")
    if isinstance(pc, Mapping) and isinstance(pc.get("addr"), str):
        return str(pc["addr"])
    value = rec.get("client_addr")
    return value if isinstance(value, str) else None


def _computed(name: str, rec: Mapping[str, Any]) -> str | None:
    return record_client(rec) if name == "client" else shape(rec.get("query"))


class Summary:
    """Counts by policy, user, application, outcome and client address.

    What one add() counts is the caller's choice (`audit --summary`: a session once per
    policy and outcome); ``records`` is how many records were read for it.
    """

    def __init__(self) -> None:
        self.total = 0
        self.records = 0
        self.counts: dict[str, Counter[str]] = {name: Counter() for name, _ in _SUMMARY_FIELDS}

    def add(self, rec: Mapping[str, Any]) -> None:
        self.total += 1
        for name, field in _SUMMARY_FIELDS:
            value = rec.get(field) if field else _computed(name, rec)
            self.counts[name][_text(value)] += 1

    def _sorted(self, name: str) -> list[tuple[str, int]]:
        return sorted(self.counts[name].items(), key=lambda kv: (-kv[1], kv[0]))

    def as_json(self) -> dict[str, Any]:
        result: dict[str, Any] = {"total": self.total, "records": self.records}
        for name, _ in _SUMMARY_FIELDS:
            result[f"by_{name}"] = dict(self._sorted(name))
        return result

    def write_text(self, out: TextIO) -> None:
        digits = len(str(self.total))
        lines = [
            f"total  {self.total}  (sessions, each once per policy and outcome;"
            f" from {self.records} records)\n"
        ]
        for name, _ in _SUMMARY_FIELDS:
            lines.append(f"\nby {name}\n")
            for key, count in self._sorted(name):
                shown = fit(key, _WIDTH.get(name, 64))[0] if key else "(empty)"
                lines.append(f"  {count:>{digits}}  {shown}\n")
        out.write("".join(lines))
