"""The shape of the last statement an audit record holds: its constants replaced by $n, so the
statements one code path runs with different values count as one."""

from __future__ import annotations

from watchdog.redact import redact


def shape(query: object) -> str | None:
    """The redacted shape of a record's ``query`` (full, truncated or already redacted: the
    same code path, the same shape); None when the record has no statement (omit)."""
    if not isinstance(query, str):
        return None
    shaped = redact(query).strip()
    return shaped or None
