"""The forecast's own record: one line when a target's forecast crossed into the alert window,
one when it was re-armed, for `advise` to say when and how fast a server filled.

Kept beside the audit log (``audit.forecast.jsonl`` next to ``audit.jsonl``), never in it:
the audit log is one record per action and `pg-watchdog audit` counts and filters its
records as such. Appended under an flock like the audit log; never through a symlink or
into anything but a regular file.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from watchdog.audit import dirfiles
from watchdog.audit import journal as jr
from watchdog.core.forecast import Episode, Forecast, Grower
from watchdog.text.timestamps import iso

Record = dict[str, Any]
SUFFIX = ".forecast.jsonl"
MAX_READ = 16 * 1024 * 1024  # two short lines per episode: far more than years of them


def forecast_path(audit_path: Path) -> Path:
    """Where the forecast records of the processes sharing ``audit_path`` go."""
    return audit_path.with_name(audit_path.stem + SUFFIX)


def _rates(growers: tuple[Grower, ...]) -> list[dict[str, Any]]:
    return [{"name": g.name, "per_min": round(60 * g.rate, 1), "now": g.now} for g in growers]


def crossed_record(target: str, server: str, fc: Forecast, within: float, pooled: bool,
                   ts: datetime) -> Record:
    """The record of a crossing: the estimate, the rate and who grew, as the alert said."""
    return {
        "ts": iso(ts),
        "target": target,
        "event": "crossed",
        "server": server,
        "used": fc.used,
        "capacity": fc.capacity,
        "eta_s": round(fc.eta_s or 0.0, 1),
        "eta_slow_end_s": round(fc.slow_eta_s or 0.0, 1),
        "rate_per_min": round(60 * fc.rate, 1),
        "fitted_over_s": fc.window_s,
        "exhaustion_within_s": within,
        "applications": _rates(fc.applications),
        "clients": _rates(fc.clients),
        "behind_pooler": pooled,
        "watchdog_host": socket.gethostname(),
        "watchdog_pid": os.getpid(),
    }


def ended_record(target: str, ep: Episode, ts: datetime) -> Record:
    """The record of a re-armed forecast: how full it got and whether it filled up."""
    return {
        "ts": iso(ts),
        "target": target,
        "event": "ended",
        "peak_used": ep.peak_used,
        "capacity": ep.start.capacity,
        "full_after_s": None if ep.full_after_s is None else round(ep.full_after_s, 1),
        "soonest_eta_s": None if ep.soonest_eta_s is None else round(ep.soonest_eta_s, 1),
        "duration_s": round(ep.duration_s, 1),
        "watchdog_host": socket.gethostname(),
        "watchdog_pid": os.getpid(),
    }


def append(path: Path, records: list[Record]) -> None:
    """Append ``records`` whole under the file's flock; OSError on failure (blocking I/O).

    As every file under the audit directory: opened relative to the directory, never through
    a link, a regular file only, and as the directory's owner when root writes it.
    """
    dir_fd = dirfiles.open_dir(path.parent)
    try:
        with dirfiles.as_owner(dir_fd, path.parent):
            flags = os.O_RDWR | os.O_APPEND
            fd, created = dirfiles.open_or_create(dir_fd, path.name, flags, path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                data = jr.encode(records)
                size = os.fstat(fd).st_size
                if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # a torn last line: ours starts on a fresh one
                jr.write_all(fd, data)
            finally:
                os.close(fd)
            if created:
                os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read(path: Path, targets: set[str], since: datetime) -> Iterator[Record]:
    """The records of ``targets`` at or after ``since``; nothing if there is no file yet.

    OSError when it exists but cannot be read; torn or foreign lines are skipped.
    """
    try:
        dir_fd = dirfiles.open_dir(path.parent)
    except FileNotFoundError:
        return
    try:
        fd = dirfiles.open_file(dir_fd, path.name, os.O_RDONLY, path)
    except FileNotFoundError:
        return
    finally:
        os.close(dir_fd)
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, MAX_READ, max(size - MAX_READ, 0))
    finally:
        os.close(fd)
    cutoff = iso(since) or ""
    for line in data.splitlines():
        rec = jr.parse(line)
        if rec is None or rec.get("target") not in targets:
            continue
        if isinstance(rec.get("ts"), str) and rec["ts"] >= cutoff:
            yield rec
