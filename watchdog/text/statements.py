"""The shape of the last statement an audit record holds: its constants replaced by $n, so the
statements one code path runs with different values count as one."""

from __future__ import annotations

import functools

from watchdog.text.redact import redact


def shape(query: object) -> str | None:
    """The redacted shape of a record's ``query`` (full, truncated or already redacted: the
    same code path, the same shape); None when the record has no statement (omit)."""
    return _shape(query) if isinstance(query, str) else None


# A log repeats a few statements many times: `audit --summary` over a million records
# would otherwise redact each one anew (about 25 µs a statement here).
@functools.lru_cache(maxsize=4096)
def _shape(query: str) -> str | None:
    return redact(query).strip() or None
