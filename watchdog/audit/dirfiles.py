"""Files under the audit directory, opened so that whoever owns it cannot redirect root.

/var/log/pg-watchdog belongs to the service's user, and DBAs run `pg-watchdog once` as
root. Every name there is opened relative to a directory fd (O_DIRECTORY|O_NOFOLLOW),
never followed when it is a symbolic link, and used only when it is a regular file.
As root in a directory another user owns, the file work is also done as that user: the
calling thread's filesystem uid and gid become the directory's, so what root creates
there belongs to that user, and a link that slipped past meets that user's permissions,
not root's. setfsuid is per thread in Linux (glibc does not broadcast it, unlike
setresuid), so the other threads keep root for the password files and TLS keys they read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pwd
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO someone planted must not hang; regular files ignore it.
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
SYMLINK = "is a symbolic link (not followed)"
NOT_REGULAR = "is not a regular file"

_owner = threading.local()  # per thread: how deep inside as_owner() it is


def _error(code: int, why: str, where: str | Path) -> OSError:
    return OSError(code, why, str(where))


def _explain(exc: OSError, where: str | Path) -> OSError:
    # A single name opened with O_NOFOLLOW fails with ELOOP only when it is a link.
    if exc.errno == errno.ELOOP:
        return _error(errno.ELOOP, SYMLINK, where)
    if exc.errno in (errno.ENXIO, errno.EISDIR):  # a socket, a directory
        return _error(exc.errno, NOT_REGULAR, where)
    exc.filename = str(where)  # the whole path, not the name relative to a directory fd
    return exc


def open_dir(path: Path, name: str | None = None, dir_fd: int | None = None) -> int:
    """A directory fd for `path` (or `name` under `dir_fd`); OSError if it is a symlink."""
    where = path if name is None else path / name
    target = str(path) if name is None else name
    try:
        return os.open(target, _DIR_FLAGS, dir_fd=dir_fd)
    except NotADirectoryError as exc:
        # O_DIRECTORY|O_NOFOLLOW on a link says ENOTDIR: say what it really is.
        try:
            link = stat.S_ISLNK(os.stat(target, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        raise (_error(errno.ELOOP, SYMLINK, where) if link else _explain(exc, where)) from None
    except OSError as exc:
        raise _explain(exc, where) from None


def open_file(dir_fd: int, name: str, flags: int, where: Path, mode: int = 0o640) -> int:
    """`name` under `dir_fd`, never through a link and only if it is a regular file."""
    try:
        fd = os.open(name, flags | _FILE_FLAGS, mode, dir_fd=dir_fd)
    except OSError as exc:
        raise _explain(exc, where) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _error(errno.EINVAL, NOT_REGULAR, where)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_or_create(dir_fd: int, name: str, flags: int, where: Path) -> tuple[int, bool]:
    """`name` opened with `flags`, created (mode 0640) if missing; whether it was created."""
    for _ in range(8):
        try:
            return open_file(dir_fd, name, flags, where), False
        except FileNotFoundError:
            pass
        try:
            return open_file(dir_fd, name, flags | os.O_CREAT | os.O_EXCL, where), True
        except FileExistsError:
            continue  # created by someone else in between: open theirs
    raise _error(errno.EAGAIN, "keeps appearing and vanishing", where)


def is_regular(dir_fd: int, name: str) -> os.stat_result | None:
    """The lstat of `name` under `dir_fd` if it is a regular file (not a link), else None."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _setfs() -> tuple[Callable[[int], int], Callable[[int], int]] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.setfsuid, libc.setfsgid
    except (OSError, AttributeError):  # not Linux: root refuses instead (see as_owner)
        return None


_SETFS = _setfs()


def _current_fsuid() -> int:
    assert _SETFS is not None
    return int(_SETFS[0](-1))  # an invalid id changes nothing and returns the current one


@contextlib.contextmanager
def as_owner(dir_fd: int, where: Path) -> Iterator[None]:
    """Run the block's file work as the owner of `dir_fd` when root runs it (this thread only).

    Root in its own directory, and any other user, runs the block unchanged.
    """
    depth = getattr(_owner, "depth", 0)
    st = os.fstat(dir_fd)
    if depth or os.geteuid() != 0 or st.st_uid == 0:
        _owner.depth = depth + 1
        try:
            yield
        finally:
            _owner.depth = depth
        return
    if _SETFS is None:
        raise _error(errno.EPERM, f"belongs to {_user(st.st_uid)}: run as that user", where)
    setfsuid, setfsgid = _SETFS
    # Each returns the previous id; an id it cannot take leaves the current one.
    gid = setfsgid(st.st_gid)
    uid = setfsuid(st.st_uid)
    try:
        if _current_fsuid() != st.st_uid:
            raise _error(errno.EPERM, f"belongs to {_user(st.st_uid)}: run as that user", where)
        _owner.depth = 1
        yield
    finally:
        _owner.depth = 0
        setfsuid(uid)
        setfsgid(gid)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
