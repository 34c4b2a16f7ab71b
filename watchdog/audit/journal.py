"""The audit log's files: locked appends, per-process intent journals, settling dead ones.

Each process keeps its intents in its own journal under ``audit.jsonl.intents/`` and
holds an exclusive flock on it while it has it open. A journal whose lock can be taken
belongs to a dead process: settling it records its unsettled intents as
``unconfirmed`` and unlinks it while still locked, so nothing is settled twice and a
live process's journal is never touched. Settling reads journals, never the log.

A journal holds four kinds of lines: intents (records with outcome ``intent``), a
commit marker written and fsynced under the log's flock just before final records are
appended (which sweeps, which file, offset, length and digest of the bytes), a
"settled" line after them, and a "not_signalled" line for sweeps that stopped after
writing their intents but before signalling (recovered as ``failed``, never as
``unconfirmed``). A process killed between the log's fsync and its "settled" line is
recognised by the commit marker's bytes in the log (or in a rotated copy that is still
the same file), not recorded twice.

A journal is created under a ``.new-`` name, locked, then renamed: an empty unlocked
``.new-`` file is one being created, never taken for a dead one. Every file is opened
relative to a directory fd, never through a symbolic link (see watchdog/audit/dirfiles.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from watchdog.audit import dirfiles
from watchdog.core.model import Result
from watchdog.text.escape import json_line

log = logging.getLogger("watchdog.journal")  # the name log filters know

Record = dict[str, Any]

JOURNALS_SUFFIX = ".intents"
_JOURNAL = re.compile(r"\d+-[0-9a-f]{8}\.intent")
NEW = ".new-"  # a journal being created: locked before it gets its name
UNCONFIRMED = "pg-watchdog stopped after deciding to signal; outcome not recorded"
NOT_SIGNALLED = "not signalled: the sweep stopped before signalling"
STOPPED = "not_signalled"  # journal line: these sweeps' intents were never signalled


def encode(records: Iterable[Record]) -> bytes:
    """JSON Lines, one record a line, safe for line-splitting tools and terminals."""
    return "".join(json_line(r) + "\n" for r in records).encode("utf-8")


def parse(line: bytes) -> Record | None:
    """The object on one line, or None for a torn or foreign one."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def journal_dir(path: Path) -> Path:
    """Where the processes sharing audit log `path` keep their intent journals."""
    return path.with_name(path.name + JOURNALS_SUFFIX)


def is_journal(name: str) -> bool:
    """Whether a file name in the journal directory is a journal (or one being created)."""
    return bool(_JOURNAL.fullmatch(name.removeprefix(NEW)))


def journals(path: Path) -> list[Path]:
    """The intent journals of audit log `path`, live or left behind."""
    try:
        names = os.listdir(journal_dir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [journal_dir(path) / n for n in sorted(names) if _JOURNAL.fullmatch(n)]


def write_all(fd: int, data: bytes, sync: bool = True) -> None:
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


def _ignored(where: Path, why: str) -> None:
    """Log once per name that a journal entry is not used: planted links, FIFOs, directories."""
    key = f"{where}: {why}"
    if key in _IGNORED:
        return
    if len(_IGNORED) >= 1024:  # a directory full of junk must not grow this without end
        _IGNORED.clear()
    _IGNORED.add(key)
    log.warning("ignoring %r in the intent journals: %s", str(where), why)


_IGNORED: set[str] = set()


def open_journals(audit_dir: int, log: Path, create: bool) -> int | None:
    """A directory fd for the journals of `log` under `audit_dir`; None if it does not exist."""
    name = log.name + JOURNALS_SUFFIX
    try:
        return dirfiles.open_dir(log.parent, name, audit_dir)
    except FileNotFoundError:
        if not create:
            return None
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o750, dir_fd=audit_dir)
        os.fsync(audit_dir)
    return dirfiles.open_dir(log.parent, name, audit_dir)


def same_file(dir_fd: int, name: str, fd: int) -> bool:
    """Whether `name` under `dir_fd` still names the file open on `fd`."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def append_locked(
    audit_dir: int, log_path: Path, data: bytes, journal: int | None, sweeps: list[str]
) -> None:
    """Append `data` to the log under its flock; with a journal, bracket it by markers.

    The file is opened anew each time, so a rotated log needs no signal. OSError on failure.
    """
    flags = os.O_RDWR | os.O_APPEND
    fd, created = dirfiles.open_or_create(audit_dir, log_path.name, flags, log_path)
    try:
        # Held across the size check, write, fsync and any rollback: concurrent writers'
        # lines never interleave, and a rollback never cuts another writer's records.
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        if st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n":
            # A crash left a torn last line: start ours on a fresh line.
            data = b"\n" + data
        if journal is not None and data:
            commit = {"commit": sweeps, "dev": st.st_dev, "ino": st.st_ino}
            commit |= {"offset": st.st_size, "length": len(data)}
            write_all(journal, encode([commit | {"sha256": hashlib.sha256(data).hexdigest()}]))
        write_all(fd, data)
    finally:
        os.close(fd)  # releases the flock
    if created:
        os.fsync(audit_dir)
    if journal is not None:
        # Unsynced: should it be lost, the commit marker proves the records are written.
        with contextlib.suppress(OSError):
            write_all(journal, encode([{"settled": sweeps}]), sync=False)


def settle(journals_fd: int, name: str, audit_dir: int, log_path: Path) -> int:
    """Settle journal `name` if its owner is dead; how many intents it recorded.

    0 for a live owner's journal, one being created, one another process settled first,
    or an entry that is not a regular file (ignored, logged once). OSError on failure,
    leaving the journal for the next attempt.
    """
    where = journal_dir(log_path) / name
    flags = os.O_RDWR | os.O_APPEND
    try:
        fd = dirfiles.open_file(journals_fd, name, flags, where)
    except FileNotFoundError:
        return 0
    except PermissionError:
        # Another user's: left for a process that may settle it; not settling it never
        # signals anything, and failing here would stop this watchdog from acting.
        _ignored(where, "permission denied; left for its owner")
        return 0
    except OSError as exc:
        if exc.strerror not in (dirfiles.SYMLINK, dirfiles.NOT_REGULAR):
            raise
        _ignored(where, exc.strerror)
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # its owner is alive: its intents are its own business
        if not same_file(journals_fd, name, fd):
            return 0  # unlinked by the process that held the lock before us
        raw = _read_fd(fd)
        if not raw and name.startswith(NEW):
            # Its creator locks it before writing a byte: empty and unlocked, it is being
            # created right now (or its creator died before locking it, holding nothing).
            return 0
        orphans = _unsettled(raw, audit_dir, log_path)
        if orphans:
            log.warning(
                "recording %d actions left by a stopped pg-watchdog (%s)", len(orphans), name
            )
            # Our own commit marker goes into the dead journal: should we die before the
            # unlink, the next recovery finds these records written.
            sweeps = sorted({str(r.get("sweep")) for r in orphans})
            append_locked(audit_dir, log_path, encode(orphans), fd, sweeps)
        os.unlink(name, dir_fd=journals_fd)  # still locked: nobody reads it again
        return len(orphans)
    finally:
        os.close(fd)


def not_signalled(intents: Iterable[Record]) -> list[Record]:
    """The final records of intents whose sweep stopped before it signalled anything."""
    return [r | {"outcome": Result.FAILED, "error": NOT_SIGNALLED} for r in intents]


def _read_fd(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _unsettled(raw: bytes, audit_dir: int, log_path: Path) -> list[Record]:
    intents: list[Record] = []
    settled: set[str] = set()
    stopped: set[str] = set()  # sweeps that never signalled
    commits: list[Record] = []
    for line in raw.splitlines():
        r = parse(line)  # a torn last line is skipped
        if r is None:
            continue
        if "settled" in r:
            settled.update(map(str, r["settled"]))
        elif STOPPED in r:
            stopped.update(map(str, r[STOPPED]))
        elif "commit" in r:
            commits.append(r)
        else:
            intents.append(r)
    for c in commits:
        sweeps = set(map(str, c["commit"]))
        if not sweeps <= settled and _committed(c, audit_dir, log_path):
            settled |= sweeps
    left = [r for r in intents if str(r.get("sweep")) not in settled]
    return [
        not_signalled([r])[0]
        if str(r.get("sweep")) in stopped
        else r | {"outcome": Result.UNCONFIRMED, "error": UNCONFIRMED}
        for r in left
    ]


def _committed(commit: Record, audit_dir: int, log_path: Path) -> bool:
    """Whether the bytes a commit marker announced are in the log (or a rotated copy)."""
    try:
        where = (int(commit["dev"]), int(commit["ino"]))
        offset, length = int(commit["offset"]), int(commit["length"])
        digest = str(commit["sha256"])
    except (KeyError, TypeError, ValueError):
        return False
    with contextlib.suppress(OSError):
        for name in os.listdir(audit_dir):
            if not name.startswith(log_path.name) or name.endswith(JOURNALS_SUFFIX):
                continue
            st = dirfiles.is_regular(audit_dir, name)  # a link is never the log
            if st is None or (st.st_dev, st.st_ino) != where:
                continue
            fd = dirfiles.open_file(audit_dir, name, os.O_RDONLY, log_path.parent / name)
            try:
                fst = os.fstat(fd)
                if (fst.st_dev, fst.st_ino) != where:
                    return False  # replaced between the look and the open
                return hashlib.sha256(os.pread(fd, length, offset)).hexdigest() == digest
            finally:
                os.close(fd)
    return False
