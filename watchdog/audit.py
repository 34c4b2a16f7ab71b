"""The audit log: JSON Lines, append-only, fsynced before a sweep reports done.

Write-ahead: before any backend is signalled, the sweep's intended actions go to
this process's own intent journal (``audit.jsonl.intents/<pid>-<random>.intent``,
flocked while the process has it open) and reach the disk; if that fails nothing
is signalled (fail closed). Final records are then appended to the shared log.
Any number of processes may share one audit path: recovery settles only dead
processes' journals (see watchdog/journal.py), so a watchdog killed between a
signal and its record leaves an intent that becomes ``unconfirmed``, once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import threading
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watchdog import journal as jr
from watchdog.model import Outcome
from watchdog.redact import redact

QUERY_TRUNCATE = 256

Record = dict[str, Any]


class AuditError(Exception):
    """The audit log cannot be written: the watchdog must not signal anything."""


def iso(ts: datetime | None) -> str | None:
    """ISO 8601 in UTC with milliseconds, ``Z``-suffixed."""
    if ts is None:
        return None
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_record(
    o: Outcome, *, server: str, sweep: str, query_mode: str, ts: datetime | None = None
) -> Record:
    """The audit record of one outcome, with every field the README's audit log section lists."""
    a, s = o.action, o.action.session
    query = s.query
    if query is None or query_mode == "full":
        pass
    elif query_mode == "redact":
        query = redact(query)
    elif query_mode == "truncate":
        query = query[:QUERY_TRUNCATE]
    else:  # omit, and any mode this code does not know: never more than asked for
        query = None
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


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


class AuditLog:
    """Appends records durably; thread-safe, one instance per process and path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal_dir = jr.journal_dir(path)
        self.intent_path = self._new_journal_name()
        # Final records that could not be written yet; they go first at the next write.
        self.backlog: list[Record] = []
        # Intents in this process's journal not yet settled by final records, by sweep.
        self._intents: dict[str, list[Record]] = {}
        self._fd: int | None = None
        # Sweeps of several targets write from worker threads.
        self._lock = threading.RLock()

    def _new_journal_name(self) -> Path:
        return self.journal_dir / f"{os.getpid()}-{secrets.token_hex(4)}.intent"

    def check_writable(self) -> None:
        """Raise AuditError unless records can be appended now."""
        with self._lock:
            try:
                jr.append_locked(self.path, b"", None, [])
            except OSError as exc:
                raise AuditError(f"cannot write audit log {self.path}: {_why(exc)}") from None

    def _journal(self) -> int:
        """This process's journal, locked; made anew if it vanished from its path."""
        if self._fd is not None and jr.same_file(self.intent_path, self._fd):
            return self._fd
        if self._fd is not None:
            # Deleted or moved away under us: the intents in flight move to a new one.
            os.close(self._fd)
            self._fd = None
            self.intent_path = self._new_journal_name()
        try:
            os.mkdir(self.journal_dir, 0o750)
            jr.adopt(self.journal_dir)
            jr.fsync_dir(self.journal_dir.parent)
        except FileExistsError:
            pass
        tmp = self.journal_dir / (jr.NEW + self.intent_path.name)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o640)
        try:
            # Locked before it gets the name recovery looks for: never taken for a dead one.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            jr.adopt(tmp)
            pending = [r for rs in self._intents.values() for r in rs]
            if pending:
                jr.write_all(fd, jr.encode(pending))
            os.rename(tmp, self.intent_path)
            jr.fsync_dir(self.journal_dir)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd = fd
        return fd

    def write_intents(self, records: list[Record]) -> None:
        """Durably note what is about to be signalled; AuditError means: signal nothing."""
        with self._lock:
            self.recover()  # settle what dead processes left before adding ours
            try:
                jr.write_all(self._journal(), jr.encode(records))
            except OSError as exc:
                raise AuditError(
                    f"cannot write audit log {self.intent_path}: {_why(exc)}"
                ) from None
            for r in records:
                self._intents.setdefault(str(r.get("sweep")), []).append(r)

    def append(self, records: list[Record]) -> None:
        """Append final records and reach the disk; then forget the intents they settle.

        On failure the records are kept and written first next time (AuditError).
        """
        with self._lock:
            pending = self.backlog + records
            if not pending:
                return
            sweeps = sorted({str(r.get("sweep")) for r in pending} & self._intents.keys())
            try:
                journal = self._journal() if sweeps else None
                jr.append_locked(self.path, jr.encode(pending), journal, sweeps)
            except OSError as exc:
                self.backlog = pending
                raise AuditError(f"cannot write audit log {self.path}: {_why(exc)}") from None
            self.backlog = []
            for sweep in sweeps:
                del self._intents[sweep]
            if not self._intents and self._fd is not None:
                # All settled: an empty journal is the cheapest one to recover.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)

    def flush_backlog(self) -> None:
        """Write records held back by an earlier failure; AuditError while it still fails."""
        with self._lock:
            if self.backlog:
                self.append([])

    def close(self) -> None:
        """Give up this process's journal: removed if all is settled, else left to recovery."""
        with self._lock:
            if self._fd is None:
                return
            if not (self._intents or self.backlog) and jr.same_file(self.intent_path, self._fd):
                with contextlib.suppress(OSError):
                    os.unlink(self.intent_path)
            os.close(self._fd)
            self._fd = None
            self.intent_path = self._new_journal_name()

    def recover(self) -> int:
        """Record as ``unconfirmed`` the intents dead processes left behind; how many."""
        with self._lock:
            try:
                names = sorted(os.listdir(self.journal_dir))
            except FileNotFoundError:
                return 0
            except OSError as exc:
                raise AuditError(f"cannot read {self.journal_dir}: {_why(exc)}") from None
            settled = 0
            for name in names:
                if name == self.intent_path.name or not jr.is_journal(name):
                    continue
                try:
                    settled += jr.settle(self.journal_dir / name, self.path)
                except OSError as exc:
                    raise AuditError(
                        f"cannot settle {self.journal_dir / name}: {_why(exc)}"
                    ) from None
            return settled
