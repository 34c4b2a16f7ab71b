"""The audit log's files: locked appends, per-process intent journals, settling dead ones.

Each process keeps its intents in its own journal under ``audit.jsonl.intents/`` and
holds an exclusive flock on it while it has it open. A journal whose lock can be taken
belongs to a dead process: settling it records its unsettled intents as
``unconfirmed`` and unlinks it while still locked, so nothing is settled twice and a
live process's journal is never touched. Settling reads journals, never the log.

A journal holds three kinds of lines: intents (records with outcome ``intent``), a
commit marker written and fsynced under the log's flock just before final records are
appended (which sweeps, which file, offset, length and digest of the bytes), and a
"settled" line after them. A process killed between the log's fsync and its "settled"
line is recognised by the commit marker's bytes in the log (or in a rotated copy that is
still the same file), not recorded twice.
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

from watchdog.escape import json_line

log = logging.getLogger(__name__)

Record = dict[str, Any]

JOURNALS_SUFFIX = ".intents"
_JOURNAL = re.compile(r"\d+-[0-9a-f]{8}\.intent")
NEW = ".new-"  # a journal being created: locked before it gets its name
UNCONFIRMED = "pg-watchdog stopped after deciding to signal; outcome not recorded"


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


def fsync_dir(path: Path) -> None:
    """Make a new directory entry in `path` durable."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def adopt(path: Path) -> None:
    """Give a file root just created the owner of its directory.

    A DBA's `once` run as root must not leave files the service's user cannot write or
    settle (/var/log/pg-watchdog belongs to that user).
    """
    if os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        st = os.stat(path.parent)
        if st.st_uid != 0:
            os.chown(path, st.st_uid, st.st_gid)


def same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open on `fd`."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def append_locked(path: Path, data: bytes, journal: int | None, sweeps: list[str]) -> None:
    """Append `data` to the log under its flock; with a journal, bracket it by markers.

    The file is opened anew each time, so a rotated log needs no signal. OSError on failure.
    """
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
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
        adopt(path)
        fsync_dir(path.parent)
    if journal is not None:
        # Unsynced: should it be lost, the commit marker proves the records are written.
        with contextlib.suppress(OSError):
            write_all(journal, encode([{"settled": sweeps}]), sync=False)


def settle(journal: Path, log_path: Path) -> int:
    """Settle `journal` if its owner is dead; how many intents it recorded as unconfirmed.

    0 for a live owner's journal or one another process settled first. OSError on failure,
    leaving the journal for the next attempt.
    """
    try:
        fd = os.open(journal, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    except PermissionError:
        # Another user's: left for a process that may settle it; not settling it never
        # signals anything, and failing here would stop this watchdog from acting.
        log.warning("cannot settle %s (permission denied); left for its owner", journal)
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # its owner is alive: its intents are its own business
        if not same_file(journal, fd):
            return 0  # unlinked by the process that held the lock before us
        orphans = _unsettled(_read_fd(fd), log_path)
        if orphans:
            log.warning(
                "recording %d unconfirmed actions left by a stopped pg-watchdog (%s)",
                len(orphans),
                journal.name,
            )
            # Our own commit marker goes into the dead journal: should we die before the
            # unlink, the next recovery finds these records written.
            sweeps = sorted({str(r.get("sweep")) for r in orphans})
            append_locked(log_path, encode(orphans), fd, sweeps)
        os.unlink(journal)  # still locked: nobody reads it again
        return len(orphans)
    finally:
        os.close(fd)


def _read_fd(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _unsettled(raw: bytes, log_path: Path) -> list[Record]:
    intents: list[Record] = []
    settled: set[str] = set()
    commits: list[Record] = []
    for line in raw.splitlines():
        r = parse(line)  # a torn last line is skipped
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
        if not sweeps <= settled and _committed(c, log_path):
            settled |= sweeps
    return [
        r | {"outcome": "unconfirmed", "error": UNCONFIRMED}
        for r in intents
        if str(r.get("sweep")) not in settled
    ]


def _committed(commit: Record, log_path: Path) -> bool:
    """Whether the bytes a commit marker announced are in the log (or a rotated copy)."""
    try:
        where = (int(commit["dev"]), int(commit["ino"]))
        offset, length = int(commit["offset"]), int(commit["length"])
        digest = str(commit["sha256"])
    except (KeyError, TypeError, ValueError):
        return False
    with contextlib.suppress(OSError):
        for name in os.listdir(log_path.parent):
            if not name.startswith(log_path.name) or name.endswith(JOURNALS_SUFFIX):
                continue
            candidate = log_path.parent / name
            st = os.stat(candidate)
            if (st.st_dev, st.st_ino) == where:
                with candidate.open("rb") as f:
                    f.seek(offset)
                    return hashlib.sha256(f.read(length)).hexdigest() == digest
    return False
