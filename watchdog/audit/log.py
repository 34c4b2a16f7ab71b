"""The audit log: JSON Lines, append-only, fsynced before a sweep reports done.

Write-ahead: before any backend is signalled, the sweep's intended actions go to
this process's own intent journal (``audit.jsonl.intents/<pid>-<random>.intent``,
flocked while the process has it open) and reach the disk; if that fails nothing
is signalled (fail closed). Final records are then appended to the shared log.
Any number of processes may share one audit path: recovery settles only dead
processes' journals (see watchdog/audit/journal.py), so a watchdog killed between a
signal and its record leaves an intent that becomes ``unconfirmed``, once.

Every file is opened through watchdog/audit/dirfiles.py: relative to the directory's fd,
never through a symbolic link, and as the directory's owner when root runs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from watchdog.audit import dirfiles
from watchdog.audit import journal as jr
from watchdog.audit.dryrun import DryRunMemory
from watchdog.core.model import Outcome
from watchdog.text.errors import reason as error_reason
from watchdog.text.redact import redact
from watchdog.text.timestamps import iso

QUERY_TRUNCATE = 256

Record = dict[str, Any]
T = TypeVar("T")


class AuditError(Exception):
    """The audit log cannot be written: the watchdog must not signal anything.

    ``report``: what the sweep did before its records could not be written (the kills
    that happened), for alerts and metrics; None when it signalled nothing.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


def shown_query(query: str | None, mode: str) -> str | None:
    """What of a session's query text goes into its records, per ``audit.query``."""
    if query is None or mode == "full":
        return query
    if mode == "redact":
        return redact(query)
    if mode == "truncate":
        return query[:QUERY_TRUNCATE]
    return None  # omit, and any mode this code does not know: never more than asked for


def make_record(
    o: Outcome, *, server: str, sweep: str, query: str | None, ts: datetime | None = None
) -> Record:
    """The audit record of one outcome, with every field the README's audit log section lists.

    ``query``: the session's query text as the records show it (``shown_query``).
    """
    a, s = o.action, o.action.session
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


def _why(exc: OSError, path: Path) -> str:
    why = error_reason(exc)
    where = exc.filename
    if isinstance(where, str) and where.startswith("/") and where != str(path):
        return f"{where}: {why}"  # the journal directory, a journal: say which
    return why


class AuditLog:
    """Appends records durably; thread-safe, one instance per process and path.

    Calls that must keep their order without blocking the event loop go through
    submit(): one worker thread per log, so a stalled disk holds one thread, not all.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal_dir = jr.journal_dir(path)
        self.intent_path = self._new_journal_name()
        # Final records that could not be written yet; they go first at the next write.
        self.backlog: list[Record] = []
        # What dry runs recorded already, per target (each session and policy once).
        self.dry_recorded = DryRunMemory()
        # Intents in this process's journal not yet settled by final records, by sweep.
        self._intents: dict[str, list[Record]] = {}
        self._fd: int | None = None
        # Sweeps of several targets write from worker threads.
        self._lock = threading.RLock()
        self._worker: ThreadPoolExecutor | None = None
        self._worker_lock = threading.Lock()
        self.busy_since: float | None = None  # monotonic start of the worker's current call

    def _new_journal_name(self) -> Path:
        return self.journal_dir / f"{os.getpid()}-{secrets.token_hex(4)}.intent"

    @contextlib.contextmanager
    def _dir(self) -> Iterator[int]:
        """The audit directory's fd; as root in another user's directory, work as that user."""
        fd = dirfiles.open_dir(self.path.parent)
        try:
            with dirfiles.as_owner(fd, self.path.parent):
                yield fd
        finally:
            os.close(fd)

    def _journals(self, audit_dir: int, create: bool) -> int | None:
        return jr.open_journals(audit_dir, self.path, create)

    # -- ordered calls off the event loop ------------------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run `fn(*args)` on this log's worker thread, after every call submitted before."""
        with self._worker_lock:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="pg-watchdog-audit")
            return self._worker.submit(self._timed, fn, *args)

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        self.busy_since = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.busy_since = None

    def _drain(self) -> None:
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=True)  # what was submitted is written before the journal goes

    # -- writing ------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Raise AuditError unless records can be appended now."""
        with self._lock:
            try:
                with self._dir() as audit_dir:
                    jr.append_locked(audit_dir, self.path, b"", None, [])
            except OSError as exc:
                raise AuditError(
                    f"cannot write audit log {self.path}: {_why(exc, self.path)}"
                ) from None

    def _journal(self, audit_dir: int) -> int:
        """This process's journal, locked; made anew if it vanished from its path."""
        journals = self._journals(audit_dir, create=True)
        assert journals is not None
        try:
            name = self.intent_path.name
            if self._fd is not None and jr.same_file(journals, name, self._fd):
                return self._fd
            if self._fd is not None:
                # Deleted or moved away under us: the intents in flight move to a new one.
                os.close(self._fd)
                self._fd = None
                self.intent_path = self._new_journal_name()
                name = self.intent_path.name
            tmp = jr.NEW + name
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL
            fd = dirfiles.open_file(journals, tmp, flags, self.journal_dir / tmp)
            try:
                # Blocking: a process settling journals may hold it for an instant, having
                # found it empty (being created) and left it alone.
                fcntl.flock(fd, fcntl.LOCK_EX)
                pending = [r for rs in self._intents.values() for r in rs]
                if pending:
                    jr.write_all(fd, jr.encode(pending))
                os.rename(tmp, name, src_dir_fd=journals, dst_dir_fd=journals)
                os.fsync(journals)
            except BaseException:
                # Unlinked while still locked: a half-made journal is never read as a dead one.
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=journals)
                os.close(fd)
                raise
            self._fd = fd
            return fd
        finally:
            os.close(journals)

    def write_intents(self, records: list[Record]) -> None:
        """Durably note what is about to be signalled; AuditError means: signal nothing."""
        with self._lock:
            try:
                with self._dir() as audit_dir:
                    self._recover(audit_dir)  # settle what dead processes left before ours
                    jr.write_all(self._journal(audit_dir), jr.encode(records))
            except OSError as exc:
                raise AuditError(
                    f"cannot write audit log {self.intent_path}: {_why(exc, self.intent_path)}"
                ) from None
            for r in records:
                self._intents.setdefault(str(r.get("sweep")), []).append(r)

    def abandon(self, sweep: str) -> None:
        """Settle `sweep`'s intents as not signalled: it stopped before signalling anything.

        A no-op if its intents never reached the journal. The journal notes it first, so
        should the records not be written now, recovery still records them as not signalled.
        """
        with self._lock:
            intents = self._intents.get(sweep)
            if not intents or self._fd is None:
                return
            with contextlib.suppress(OSError):
                jr.write_all(self._fd, jr.encode([{jr.STOPPED: [sweep]}]))
            with contextlib.suppress(AuditError):  # kept in the backlog, written later
                self.append(jr.not_signalled(intents))

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
                with self._dir() as audit_dir:
                    journal = self._journal(audit_dir) if sweeps else None
                    jr.append_locked(audit_dir, self.path, jr.encode(pending), journal, sweeps)
            except OSError as exc:
                self.backlog = pending
                raise AuditError(
                    f"cannot write audit log {self.path}: {_why(exc, self.path)}"
                ) from None
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
        """Give up this process's journal: removed if all is settled, else left to recovery.

        Calls submitted before are finished first.
        """
        self._drain()
        with self._lock:
            if self._fd is None:
                return
            if not (self._intents or self.backlog):
                with contextlib.suppress(OSError), self._dir() as audit_dir:
                    journals = self._journals(audit_dir, create=False)
                    if journals is not None:
                        try:
                            name = self.intent_path.name
                            if jr.same_file(journals, name, self._fd):
                                os.unlink(name, dir_fd=journals)
                        finally:
                            os.close(journals)
            os.close(self._fd)
            self._fd = None
            self.intent_path = self._new_journal_name()

    # -- recovery -----------------------------------------------------------------------

    def recover(self) -> int:
        """Record what dead processes' journals left unsettled; how many records."""
        with self._lock:
            try:
                with self._dir() as audit_dir:
                    return self._recover(audit_dir)
            except FileNotFoundError:
                return 0  # no audit directory yet: nothing to recover
            except OSError as exc:
                raise AuditError(
                    f"cannot write audit log {self.path}: {_why(exc, self.path)}"
                ) from None

    def _recover(self, audit_dir: int) -> int:
        journals = self._journals(audit_dir, create=False)
        if journals is None:
            return 0
        try:
            settled = 0
            for name in sorted(os.listdir(journals)):
                if name == self.intent_path.name or not jr.is_journal(name):
                    continue
                settled += jr.settle(journals, name, audit_dir, self.path)
            return settled
        finally:
            os.close(journals)
