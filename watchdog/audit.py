"""The audit log: JSON Lines, append-only, fsynced before a sweep reports done.

Write-ahead: before any backend is signalled, the sweep's intended actions go to
this process's own intent journal (``audit.jsonl.intents/<pid>-<random>.intent``)
and reach the disk; if that fails nothing is signalled (fail closed). The process
holds an exclusive flock on its journal for as long as it has one open.

Any number of processes may share one audit path. Recovery settles only journals
whose lock it can take, that is whose owner is dead: their unsettled intents are
recorded as ``unconfirmed`` and the journal is unlinked while still locked, so a
live process's intents are never touched and nothing is settled twice. Recovery
reads journals, never the log, so rotation and the log's size do not matter.

Appending final records is one O_APPEND write and fsync under a flock on the log,
so concurrent writers' lines never interleave. Just before it, a commit marker
(which sweeps, and where in which file) is fsynced to the journal: a process killed
between the log's fsync and the journal's "settled" line is recognised by its
bytes in the log, not recorded twice. Every write opens the log anew, so rotation
needs no signal.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watchdog.model import Outcome

log = logging.getLogger(__name__)

QUERY_TRUNCATE = 256
JOURNALS_SUFFIX = ".intents"
_JOURNAL = re.compile(r"\d+-[0-9a-f]{8}\.intent")
_NEW = ".new-"  # a journal being created: not yet locked, never recovered
_UNCONFIRMED = "pg-watchdog stopped after deciding to signal; outcome not recorded"

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
    """The audit record of one outcome."""
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
        "query": query,
        "server": server,
        "watchdog_host": socket.gethostname(),
        "watchdog_pid": os.getpid(),
        "sweep": sweep,
    }


# Valid inside JSON strings, but str.splitlines() and many tools break lines on them.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _encode(records: Iterable[Record]) -> bytes:
    lines = (json.dumps(r, ensure_ascii=False).translate(_LINE_BREAKS) + "\n" for r in records)
    return "".join(lines).encode("utf-8")


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def journal_dir(path: Path) -> Path:
    """Where the processes sharing audit log `path` keep their intent journals."""
    return path.with_name(path.name + JOURNALS_SUFFIX)


def journals(path: Path) -> list[Path]:
    """The intent journals of audit log `path`, live or left behind."""
    try:
        names = os.listdir(journal_dir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [journal_dir(path) / n for n in sorted(names) if _JOURNAL.fullmatch(n)]


def _write_all(fd: int, data: bytes, sync: bool = True) -> None:
    """Append `data` to `fd` whole, or leave the file as it was and raise OSError."""
    size = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except OSError:
        # A short write (disk full, file size limit) must leave no part of the batch
        # behind: the retry writes every record again, whole, and a partial intent
        # would later be recovered as an action that was never taken.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _read_fd(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class AuditLog:
    """Appends records durably; thread-safe, one instance per process and path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal_dir = journal_dir(path)
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

    # -- the shared log ----------------------------------------------------------------

    def _append_log(self, data: bytes, journal: int | None, sweeps: list[str]) -> None:
        """Append `data` under the log's flock; with a journal, bracket it by markers."""
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            if st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n":
                # A crash left a torn last line: start ours on a fresh line.
                data = b"\n" + data
            if journal is not None and data:
                commit = {"commit": sweeps, "dev": st.st_dev, "ino": st.st_ino}
                commit |= {"offset": st.st_size, "sha256": hashlib.sha256(data).hexdigest()}
                _write_all(journal, _encode([commit | {"length": len(data)}]))
            _write_all(fd, data)
        finally:
            os.close(fd)  # releases the flock
        if created:
            _fsync_dir(self.path.parent)
        if journal is not None:
            # Unsynced: should it be lost, the commit marker proves the records are written.
            with contextlib.suppress(OSError):
                _write_all(journal, _encode([{"settled": sweeps}]), sync=False)

    def check_writable(self) -> None:
        """Raise AuditError unless records can be appended now."""
        with self._lock:
            try:
                self._append_log(b"", None, [])
            except OSError as exc:
                raise AuditError(f"cannot write audit log {self.path}: {_why(exc)}") from None

    # -- this process's journal ------------------------------------------------------

    def _journal(self) -> int:
        """This process's journal, locked; made anew if it vanished from its path."""
        if self._fd is not None and _same_file(self.intent_path, self._fd):
            return self._fd
        if self._fd is not None:
            # Deleted or moved away under us: the intents in flight move to a new one.
            os.close(self._fd)
            self._fd = None
            self.intent_path = self._new_journal_name()
        try:
            os.mkdir(self.journal_dir, 0o750)
            _fsync_dir(self.journal_dir.parent)
        except FileExistsError:
            pass
        tmp = self.journal_dir / (_NEW + self.intent_path.name)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o640)
        try:
            # Locked before it gets a name recovery looks at: never taken for a dead one's.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            pending = [r for rs in self._intents.values() for r in rs]
            if pending:
                _write_all(fd, _encode(pending))
            os.rename(tmp, self.intent_path)
            _fsync_dir(self.journal_dir)
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
                _write_all(self._journal(), _encode(records))
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
                self._append_log(_encode(pending), journal, sweeps)
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
            if not self._intents and not self.backlog and _same_file(self.intent_path, self._fd):
                with contextlib.suppress(OSError):
                    os.unlink(self.intent_path)
            os.close(self._fd)
            self._fd = None
            self.intent_path = self._new_journal_name()

    # -- recovery ----------------------------------------------------------------------

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
                if name == self.intent_path.name:
                    continue
                if _JOURNAL.fullmatch(name) or (
                    name.startswith(_NEW) and _JOURNAL.fullmatch(name[len(_NEW) :])
                ):
                    settled += self._settle(self.journal_dir / name)
            return settled

    def _settle(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0  # settled by another process meanwhile
        except OSError as exc:
            raise AuditError(f"cannot read {path}: {_why(exc)}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its owner is alive: its intents are its own business
            if not _same_file(path, fd):
                return 0  # unlinked by the recoverer that held the lock before us
            orphans = self._unsettled(_read_fd(fd))
            if orphans:
                log.warning(
                    "recording %d unconfirmed actions left by a stopped pg-watchdog (%s)",
                    len(orphans),
                    path.name,
                )
                sweeps = sorted({str(r.get("sweep")) for r in orphans})
                self._append_log(_encode(orphans), fd, sweeps)
            os.unlink(path)  # still locked: nobody else reads it again
        except OSError as exc:
            raise AuditError(f"cannot settle {path}: {_why(exc)}") from None
        finally:
            os.close(fd)
        return len(orphans)

    def _unsettled(self, raw: bytes) -> list[Record]:
        intents: list[Record] = []
        settled: set[str] = set()
        commits: list[Record] = []
        for line in raw.splitlines():
            r = _parse(line)  # a torn last line is skipped
            if r is None:
                continue
            if "settled" in r:
                settled.update(map(str, r["settled"]))
            elif "commit" in r:
                commits.append(r)
            else:
                intents.append(r)
        for c in commits:
            sweeps = set(map(str, c["commit"]))
            if not sweeps <= settled and self._committed(c):
                settled |= sweeps
        return [
            r | {"outcome": "unconfirmed", "error": _UNCONFIRMED}
            for r in intents
            if str(r.get("sweep")) not in settled
        ]

    def _committed(self, commit: Record) -> bool:
        """Whether the bytes a commit marker announced are in the log (or a rotated copy)."""
        try:
            where = (int(commit["dev"]), int(commit["ino"]))
            offset, length = int(commit["offset"]), int(commit["length"])
            digest = str(commit["sha256"])
        except (KeyError, TypeError, ValueError):
            return False
        with contextlib.suppress(OSError):
            for name in os.listdir(self.path.parent):
                if not name.startswith(self.path.name) or name.endswith(JOURNALS_SUFFIX):
                    continue
                candidate = self.path.parent / name
                st = os.stat(candidate)
                if (st.st_dev, st.st_ino) == where:
                    with candidate.open("rb") as f:
                        f.seek(offset)
                        return hashlib.sha256(f.read(length)).hexdigest() == digest
        return False


def _parse(line: bytes) -> Record | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
