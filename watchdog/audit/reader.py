"""Reading the audit log: every record of a file and its rotated ones, oldest first.

Reading streams record by record, so a log of millions of lines costs little memory. A torn
line (the daemon crashed mid-write) or any other garbage is skipped and counted, never fatal.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import os
import re
import sys
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from watchdog.audit import dirfiles
from watchdog.config.units import parse_duration
from watchdog.text.errors import reason

# logrotate names: PATH.1, PATH.2.gz (higher is older) or, with dateext, PATH-20261125.gz
# and PATH-20261125-1764028800.gz (dateformat -%Y%m%d-%s: the epoch orders one day's files).
_ROTATED = r"(?:\.(\d+)|-(\d{8,})(?:-(\d+))?)(\.gz|\.bz2|\.xz)?"
_TORN_RETRIES = 8

Record = dict[str, Any]


def parse_when(text: str, now: datetime) -> datetime:
    """`text` as an aware UTC datetime: a duration before `now`, or an ISO 8601 timestamp."""
    stripped = text.strip()
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    if stripped.lower() == "now":
        return now.astimezone(UTC)
    # The same durations as the policy file.
    with contextlib.suppress(ValueError):
        seconds = parse_duration(stripped)
        try:
            return (now - timedelta(seconds=seconds)).astimezone(UTC)
        except OverflowError:
            raise ValueError(f"{text!r} reaches too far into the past") from None
    try:
        when = datetime.fromisoformat(stripped)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(
            f"{text!r} is neither a duration (e.g. 30s, 10m, 1h30m, 2d) "
            "nor an ISO 8601 timestamp (e.g. 2026-11-25T12:00:00Z)"
        ) from None


def audit_files(path: Path) -> list[Path]:
    """The rotated files of `path`, oldest first, then `path` itself if it exists."""
    pattern = re.compile(re.escape(path.name) + _ROTATED)
    rotated: list[tuple[int, str, int, str, Path]] = []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            m = pattern.fullmatch(entry.name)
            if m is None:
                continue
            if entry.is_symlink():
                # Whoever owns the directory could point it at a file only root may read.
                warn(f"not following {path.parent / entry.name}: {dirfiles.SYMLINK}")
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            number, date, epoch, _ = m.groups()
            file = path.parent / entry.name
            if date is not None:
                # %Y%m%d, %Y%m%d%H, ... : padded, so a longer stamp of the same day sorts after.
                rotated.append((0, date.ljust(14, "0"), int(epoch or 0), entry.name, file))
            else:
                rotated.append((1, "", -int(number), entry.name, file))
    files = [entry for *_, entry in sorted(rotated)]
    if os.path.lexists(path) or not files:
        files.append(path)
    return files


@contextlib.contextmanager
def open_log(path: Path) -> Iterator[io.BufferedIOBase]:
    """`path` for reading, never through a symbolic link, only if it is a regular file."""
    dir_fd = dirfiles.open_dir(path.parent)
    try:
        fd = dirfiles.open_file(dir_fd, path.name, os.O_RDONLY, path)
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz
        elif path.suffix == ".bz2":
            with bz2.BZ2File(raw, "rb") as bz:
                yield bz
        elif path.suffix == ".xz":
            with lzma.LZMAFile(raw, "rb") as xz:
                yield xz
        else:
            yield raw


def _loads(line: bytes) -> Record | None:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _parse_line(line: bytes) -> tuple[Record | None, int]:
    """The record on `line` (or None) and how many unreadable pieces it held."""
    line = line.strip(b" \t\r\n")
    if not line:
        return None, 0
    rec = _loads(line)
    if rec is not None:
        return rec, 0
    # After a crash the daemon may append its next record to the torn one: salvage it.
    # `{"` cannot occur raw inside a JSON string, so each hit starts a candidate object.
    start = line.find(b'{"', 1)
    for _ in range(_TORN_RETRIES):
        if start == -1:
            break
        rec = _loads(line[start:])
        if rec is not None:
            return rec, 1
        start = line.find(b'{"', start + 1)
    return None, 1


def warn(message: str) -> None:
    print(f"pg-watchdog: {message}", file=sys.stderr)


def _read_file(path: Path) -> Iterator[Record]:
    unreadable = 0
    with open_log(path) as lines:
        for line in lines:
            rec, bad = _parse_line(line)
            unreadable += bad
            if rec is not None:
                yield rec
    if unreadable:
        warn(f"skipped {unreadable} unreadable lines in {path}")


def iter_records(path: Path, since: datetime | None = None) -> Iterator[Record]:
    """Every record of `path` and its rotated files, oldest file first.

    `since` only lets whole rotated files last modified before it be skipped; records
    are not filtered. An unreadable rotated file is reported and skipped; `path`
    itself failing raises OSError.
    """
    for file in audit_files(path):
        if file == path:
            yield from _read_file(file)
            continue
        try:
            if since is not None and os.lstat(file).st_mtime < since.timestamp():
                continue
            yield from _read_file(file)
        except (OSError, EOFError, zlib.error) as e:
            warn(f"cannot read rotated audit log {file}: {reason(e)}")


