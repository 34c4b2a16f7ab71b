"""The audit log: JSON Lines, append-only, fsynced before a sweep reports done.

Write-ahead: before any backend is signalled, the sweep's intended actions go
to an intent journal beside the log (``audit.jsonl.intent``) and reach the
disk. If that fails nothing is signalled (fail closed). After the signals the
final records are appended and, once no sweep of this process is in flight,
the journal is emptied. A watchdog killed in between leaves the journal behind;
the next start records those actions as ``unconfirmed``, so no signal is ever
missing from the log.

Several sweeps (one per target) run concurrently against one journal: intents
are appended, never overwritten, and a sweep still in flight in this process is
never mistaken for one a killed watchdog left behind (one AuditLog per process
and path: its instance knows which sweeps are in flight).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watchdog.model import Outcome

log = logging.getLogger(__name__)

QUERY_TRUNCATE = 256
_TAIL_BYTES = 4 << 20  # how far back recovery looks for a sweep's final records


class AuditError(Exception):
    """The audit log cannot be written: the watchdog must not signal anything."""


def iso(ts: datetime | None) -> str | None:
    """ISO 8601 in UTC with milliseconds, ``Z``-suffixed."""
    if ts is None:
        return None
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_record(
    o: Outcome, *, server: str, sweep: str, query_mode: str, ts: datetime | None = None
) -> dict[str, Any]:
    """The audit record of one outcome, with every field the README's audit log section lists."""
    a, s = o.action, o.action.session
    query = s.query
    if query_mode == "omit":
        query = None
    elif query_mode == "truncate" and query is not None:
        query = query[:QUERY_TRUNCATE]
    return {
        "ts": iso(ts or datetime.now(UTC)),
        "target": a.target,
        "policy": a.policy,
        "action": a.action,
        "dry_run": a.dry_run,
        "outcome": o.outcome,
        "error": o.error,
        "pid": s.pid,
        "backend_start": iso(s.backend_start),
        "usename": s.usename,
        "datname": s.datname,
        "application_name": s.application_name,
        "client_addr": s.client_addr,
        "state": s.state,
        "state_change": iso(s.state_change),
        "xact_start": iso(s.xact_start),
        "query_start": iso(s.query_start),
        "age_s": round(a.age_s, 3),
        # Who waited on it (always an object: zeros when nobody did) and how far it held
        # back vacuum (transactions since its backend_xmin; null without a snapshot).
        "blocking": {
            "sessions": a.blocking.sessions if a.blocking else 0,
            "longest_wait_s": round(a.blocking.longest_wait_s, 3) if a.blocking else 0.0,
        },
        "xmin_age": s.xmin_age,
        "query": query,
        "server": server,
        "watchdog_host": socket.gethostname(),
        "watchdog_pid": os.getpid(),
        "sweep": sweep,
        "pooler": a.link.pooler if a.link else None,
        "pooler_client": asdict(a.link.client) if a.link and a.link.client else None,
    }


# Valid inside JSON strings, but str.splitlines() and many tools break lines on them.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _encode(records: Iterable[dict[str, Any]]) -> bytes:
    lines = (json.dumps(r, ensure_ascii=False).translate(_LINE_BREAKS) + "\n" for r in records)
    return "".join(lines).encode("utf-8")


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


class AuditLog:
    """Appends records durably; each write opens the file anew, so rotation needs no signal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.intent_path = path.with_name(path.name + ".intent")
        # Final records that could not be written yet; they go first at the next write.
        self.backlog: list[dict[str, Any]] = []
        # Sweeps whose intents are in the journal and not yet settled by final records:
        # alive in this process, so never recovered as a killed watchdog's.
        self._inflight: set[str] = set()

    def _write(self, path: Path, data: bytes, truncate: bool = False) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if truncate else os.O_APPEND)
        created = not path.exists()
        fd = os.open(path, flags, 0o640)
        try:
            size = os.fstat(fd).st_size
            if not truncate and size > 0 and os.pread(fd, 1, size - 1) != b"\n":
                # A crash left a torn last line: start ours on a fresh line.
                data = b"\n" + data
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                # A short write (disk full, file size limit) must leave no part of the batch
                # behind: the retry writes every record again, whole, and a partial intent
                # would later be recovered as an action that was never taken.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if created:
            dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def check_writable(self) -> None:
        """Raise AuditError unless records can be appended now."""
        try:
            self._write(self.path, b"")
        except OSError as exc:
            raise AuditError(f"cannot write audit log {self.path}: {_why(exc)}") from None

    def write_intents(self, records: list[dict[str, Any]]) -> None:
        """Durably note what is about to be signalled; AuditError means: signal nothing."""
        self.recover()  # settle what a killed predecessor left before adding ours
        try:
            # Appended: concurrent sweeps of other targets may have intents in flight here.
            self._write(self.intent_path, _encode(records))
        except OSError as exc:
            raise AuditError(f"cannot write audit log {self.intent_path}: {_why(exc)}") from None
        self._inflight.update(str(r.get("sweep")) for r in records)

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append final records and reach the disk; then forget the intents they settle.

        On failure the records are kept and written first next time (AuditError).
        """
        pending = self.backlog + records
        if not pending:
            return
        try:
            self._write(self.path, _encode(pending))
        except OSError as exc:
            self.backlog = pending
            raise AuditError(f"cannot write audit log {self.path}: {_why(exc)}") from None
        self.backlog = []
        self._inflight.difference_update(str(r.get("sweep")) for r in pending)
        if not self._inflight:
            self._clear_intents()

    def flush_backlog(self) -> None:
        """Write records held back by an earlier failure; AuditError while it still fails."""
        if self.backlog:
            self.append([])

    def _clear_intents(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.intent_path.stat().st_size:
                os.truncate(self.intent_path, 0)

    def recover(self) -> int:
        """Record intents a killed watchdog left behind as ``unconfirmed``; how many."""
        try:
            raw = self.intent_path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise AuditError(f"cannot read {self.intent_path}: {_why(exc)}") from None
        intents = [r for r in (_parse(line) for line in raw.splitlines()) if r is not None]
        if not intents:
            return 0
        settled = self._recent_sweeps() | self._inflight  # in flight: ours, alive
        orphans = []
        for r in intents:
            if str(r.get("sweep")) not in settled:
                r["outcome"] = "unconfirmed"
                r["error"] = "pg-watchdog stopped after deciding to signal; outcome not recorded"
                orphans.append(r)
        if orphans:
            log.warning("recording %d unconfirmed actions left by a previous run", len(orphans))
            self.append(orphans)
        elif not self._inflight:
            self._clear_intents()
        return len(orphans)

    def _recent_sweeps(self) -> set[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(max(f.seek(0, os.SEEK_END) - _TAIL_BYTES, 0))
                tail = f.read()
        except FileNotFoundError:
            return set()
        return {str(r.get("sweep")) for r in map(_parse, tail.splitlines()) if r is not None}


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
