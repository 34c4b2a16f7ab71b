"""Timestamps in output: one form for records (milliseconds), one for people (seconds), UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: datetime | None) -> str | None:
    """ISO 8601 in UTC with milliseconds, ``Z``-suffixed: the audit log's form."""
    if ts is None:
        return None
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def shown(ts: datetime) -> str:
    """ISO 8601 in UTC to the second, ``Z``-suffixed: the form tables and findings show."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(value: object) -> datetime | None:
    """The aware UTC datetime of an ISO 8601 value (naive counts as UTC), or None."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
        if when.tzinfo is None:
            return when.replace(tzinfo=UTC)
        return when.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
