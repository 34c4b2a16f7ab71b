"""Throwaway PostgreSQL clusters (initdb + pg_ctl on a free loopback port) for the test suite, the
benchmarks and ``pg-watchdog demo``, which runs on real database hosts. As root, PostgreSQL runs
as ``postgres`` (or ``nobody``) via ``runuser``, from binaries tempbin finds (or copies
privately). TCP logins need the cluster's random password (SCRAM; clients find it in the
process's passfile, see tempauth); the trusted Unix socket sits in the 0700 data directory.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from watchdog.commands.demo import tempauth
from watchdog.commands.demo.tempbin import (
    BINARY_CACHE,
    FILL_CACHE,
    ClusterError,
    _one_line,
    _run,
    accessible_bindir,
    available_majors,
    cached,
    find_bindir,
    run_as_user,
    untrusted,
)

__all__ = [
    "BINARY_CACHE", "FILL_CACHE", "ClusterError", "TempCluster", "_alive", "_one_line", "_run",
    "accessible_bindir", "available_majors", "cached", "find_bindir", "free_port",
    "run_as_user", "start_cluster", "start_standby", "temp_cluster", "untrusted",
]

_LIVE: set[TempCluster] = set()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    # Every login role's password over TCP (see tempauth): never in a DSN, repr or log line.
    password: str = field(default="", repr=False)
    scram_secret: str = field(default="", repr=False)  # its verifier, as in pg_authid
    listen_hosts: tuple[str, ...] = tempauth.LOOPBACK  # how clients name it in the passfile
    _pid: int | None = None

    def dsn(self, user: str = "postgres", database: str = "postgres") -> str:
        """A DSN without a password: clients take it from PGPASSFILE (tempauth.passfile)."""
        return f"postgresql://{quote(user, safe='')}@{self.host}:{self.port}/{quote(database)}"

    @property
    def socket_dir(self) -> Path:
        """The Unix socket's directory: the data directory, 0700 to the server's OS user."""
        return self.datadir

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
        if self.password:
            tempauth.remember(self.port, self.password, self.listen_hosts)

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

    def _psql(self, script: str, user: str, database: str, timeout: float,
              variables: Mapping[str, str] | None = None) -> str:
        # Over the private Unix socket (trust), as the server's OS user: no password needed.
        args = [f"--variable={k}={v}" for k, v in (variables or {}).items()]
        res = self._run(["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", *args, "-h",
                         str(self.socket_dir), "-p", str(self.port), "-U", user, "-d", database,
                         "-f", "-"], input=script, timeout=timeout)
        if res.returncode != 0:
            raise ClusterError(f"psql on PostgreSQL {self.major} failed: {_one_line(res.stderr)}")
        return res.stdout.rstrip("\n")

    def psql(self, sql: str, user: str = "postgres", database: str = "postgres",
             timeout: float = 60) -> str:
        """Run ``sql`` with the cluster's psql -XAtq (over the Unix socket); stdout minus
        trailing newline. Login roles it creates get the cluster's password (sync_passwords)."""
        if user != self.superuser:
            out = self._psql(sql, user, database, timeout)
            self.sync_passwords()
            return out
        # The `;` ends a last statement that has none; the sync then runs in the same session.
        return self._psql(f"{sql}\n;\n{tempauth.SYNC_PASSWORDS}", user, database, timeout)

    def sync_passwords(self) -> None:
        """Give every login role that has no password the cluster's: for roles created other
        than through :meth:`psql` (asyncpg, another psql), before they log in over TCP."""
        self._psql(tempauth.SYNC_PASSWORDS, self.superuser, "postgres", 60)

    def set_password(self, role: str, password: str) -> None:
        """Give ``role`` a password of its own, which this process's clients then find in the
        passfile. Not the superuser's: its verifier is the one every new role gets."""
        if role == self.superuser:
            raise ClusterError(f"the password of {role} is the cluster's; use another role")
        literal = password.replace("'", "''")  # through psql's stdin, never its arguments
        self._psql(f"ALTER ROLE :\"role\" PASSWORD '{literal}'", self.superuser, "postgres", 60,
                   {"role": role})
        tempauth.remember_role(self.port, role, password)

    def reset_passwords(self, *roles: str) -> None:
        """Give ``roles`` the cluster's password again (after a test set its own)."""
        self._psql(f"SET pg_watchdog.reset = :'reset';\n{tempauth.SYNC_PASSWORDS}",
                   self.superuser, "postgres", 60, {"reset": json.dumps(list(roles))})
        for role in roles:
            tempauth.remember_role(self.port, role, None)

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
        tempauth.forget(self.port, self.password)


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


def _initdb(cluster: TempCluster) -> None:
    """initdb with SCRAM on TCP and trust on the Unix socket; the superuser's password is set
    from its verifier (the pwfile lives in the private base dir, only while initdb runs)."""
    pwfile = cluster.basedir / "pwfile"
    try:
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if cluster.os_user:
                owner = pwd.getpwnam(cluster.os_user)
                os.fchown(fd, owner.pw_uid, owner.pw_gid)
            os.write(fd, f"{cluster.scram_secret}\n".encode())
        finally:
            os.close(fd)
        res = cluster._run(["initdb", "-D", str(cluster.datadir), "-U", cluster.superuser,
                            "--auth-local=trust", "--auth-host=scram-sha-256",
                            f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C",
                            "--no-instructions", "--no-sync"])
    finally:
        pwfile.unlink(missing_ok=True)
    if res.returncode != 0:
        raise ClusterError(f"initdb {cluster.major} failed: {_one_line(res.stderr or res.stdout)}")


def start_cluster(major: int, *, max_connections: int = 30,
                  settings: Mapping[str, str] | None = None,
                  base_dir: Path | None = None, with_openssl: bool = False) -> TempCluster:
    """initdb + start a throwaway cluster; on any failure clean up and raise ClusterError.
    ``settings`` are appended to postgresql.conf verbatim (quote strings yourself). TCP
    requires SCRAM with the cluster's random password; the Unix socket trusts, but only the
    server's OS user (and root) can enter its directory."""
    if major < 16 and settings and "reserved_connections" in settings:
        raise ClusterError(f"reserved_connections needs PostgreSQL 16+, not {major}")
    user = run_as_user()
    bindir = accessible_bindir(find_bindir(major, with_openssl=with_openssl), user)
    basedir = Path(tempfile.mkdtemp(prefix="pg-watchdog-", dir=base_dir)).resolve()
    password = tempauth.new_password()
    cluster = TempCluster(major=major, bindir=bindir, basedir=basedir, datadir=basedir / "data",
                          port=free_port(), log_path=basedir / "postgresql.log", os_user=user,
                          password=password, scram_secret=tempauth.scram_verifier(password))
    conf_path = cluster.datadir / "postgresql.conf"
    try:
        if user:
            shutil.chown(basedir, user)
        _initdb(cluster)
        conf = {"listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{cluster.datadir}'",
                "max_connections": str(max_connections), "superuser_reserved_connections": "3",
                "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                "shared_buffers": "32MB", "logging_collector": "off",
                "log_destination": "'stderr'", "log_line_prefix": "'%m [%p] %a '",
                **(settings or {})}
        with conf_path.open("a") as f:
            f.writelines(f"{key} = {value}\n" for key, value in conf.items())
        cluster.listen_hosts = tempauth.listen_hosts(conf["listen_addresses"])
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
                          log_path=basedir / "postgresql.log", os_user=primary.os_user,
                          password=primary.password, scram_secret=primary.scram_secret,
                          listen_hosts=primary.listen_hosts)
    conf_path = standby.datadir / "postgresql.conf"
    try:
        if primary.os_user:
            shutil.chown(basedir, primary.os_user)
        # Through the primary's private socket (same OS user): it streams from there too.
        res = standby._run(["pg_basebackup", "-D", str(standby.datadir), "-R", "-X", "stream",
                            "-h", str(primary.socket_dir), "-p", str(primary.port),
                            "-U", primary.superuser, "--no-sync"], timeout=120)
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
