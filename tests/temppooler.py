"""Throwaway PgBouncer instances in front of a TempCluster, for the tests and the benchmarks.

Each one gets a generated ini and auth file in its own private temp dir (clients log in with
SCRAM and the cluster's password, which PgBouncer passes through to PostgreSQL; the watchdog
role in admin_users and stats_users) and runs as the same unprivileged OS user as PostgreSQL,
never as the system service. Binaries: Debian's /usr/sbin/pgbouncer, or a build in the cache
.ci/test-binaries fills (1.24).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.commands.demo import tempauth
from watchdog.commands.demo.tempcluster import (
    BINARY_CACHE,
    FILL_CACHE,
    ClusterError,
    TempCluster,
    _alive,
    _one_line,
    _run,
    cached,
    run_as_user,
)

PGBOUNCER = Path("/usr/sbin/pgbouncer")
_AUTH_USERS = ("watchdog", "app", "postgres")


@functools.cache
def pgbouncer_version(binary: Path) -> str | None:
    """``major.minor`` of a pgbouncer binary (``1.24``), or None if it does not run."""
    with contextlib.suppress(ClusterError):
        m = re.match(r"PgBouncer (\d+\.\d+)\.", _run([str(binary), "--version"], None).stdout)
        return m.group(1) if m else None
    return None


def find_pgbouncer(version: str, cache: Path = BINARY_CACHE) -> Path:
    """The pgbouncer binary of ``version`` (``major.minor``): Debian's, or a cached build."""
    builds, refused = cached("pgbouncer", "pgbouncer", cache)
    for binary in (PGBOUNCER, *(bindir / "pgbouncer" for bindir in builds)):
        if binary.exists() and pgbouncer_version(binary) == version:
            return binary
    raise ClusterError(f"PgBouncer {version} not found at {PGBOUNCER} nor in {cache} (apt-get "
                       f"install pgbouncer, or a checkout's {FILL_CACHE} to fill {cache})"
                       + "".join(f"; {reason}" for reason in refused))


@dataclass(eq=False)
class TempPooler:
    """A throwaway PgBouncer; see :func:`start_pooler`."""

    basedir: Path
    port: int
    os_user: str | None
    listen_addr: str = "127.0.0.1"
    binary: Path = PGBOUNCER
    password: str = field(default="", repr=False)  # the cluster's, for every user it knows
    _pid: int | None = None

    @property
    def ini(self) -> Path:
        return self.basedir / "pgbouncer.ini"

    @property
    def log_path(self) -> Path:
        return self.basedir / "pgbouncer.log"

    def dsn(self, user: str = "watchdog", database: str = "pgbouncer",
            host: str = "127.0.0.1") -> str:
        """A DSN without a password: clients take it from PGPASSFILE (tempauth.passfile)."""
        return f"postgresql://{user}@{host}:{self.port}/{database}"

    def log_tail(self, lines: int = 4) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return _one_line(text, lines)

    def is_running(self) -> bool:
        return self._pid is not None and _alive(self._pid)

    def start(self) -> None:
        """Start PgBouncer (daemonized) and wait until it accepts connections."""
        if self.is_running():
            return
        pidfile = self.basedir / "pgbouncer.pid"
        with contextlib.suppress(OSError):
            pidfile.unlink()
        # runuser's PAM session resets the soft open-files limit to 1024: a pool of a
        # thousand servers needs more, so take the hard limit.
        script = 'ulimit -S -n "$(ulimit -H -n)"; exec "$0" "$@"'
        res = _run(["sh", "-c", script, str(self.binary), "-d", str(self.ini)], self.os_user,
                   cwd=self.basedir)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            # IndexError: PgBouncer has created its pid file but not written it yet.
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(pidfile.read_text().split()[0])
                if _alive(pid) and _accepts(self.port):
                    self._pid = pid
                    return
            time.sleep(0.02)
        raise ClusterError(f"PgBouncer failed to start on port {self.port}: {self.log_tail()}"
                           f" [{_one_line(res.stderr, 1)}]")

    def pause(self) -> None:
        """SIGSTOP: a hung PgBouncer that keeps its sockets open."""
        if self._pid is not None:
            os.kill(self._pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._pid is not None:
            os.kill(self._pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGINT (immediate shutdown) and wait for the process to exit."""
        self.resume()
        pid, self._pid = self._pid, None
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        while _alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def cleanup(self) -> None:
        """Stop and remove the temp dir. Idempotent."""
        self.stop()
        shutil.rmtree(self.basedir, ignore_errors=True)
        tempauth.forget(self.port, self.password)


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_pooler(cluster: TempCluster, *, pool_mode: str = "transaction",
                 settings: Mapping[str, str] | None = None, listen_addr: str = "127.0.0.1",
                 base_dir: Path | None = None, binary: Path = PGBOUNCER) -> TempPooler:
    """Start a PgBouncer (``binary``, see :func:`find_pgbouncer`) in front of ``cluster`` (every
    database, ``pool_mode``); ``settings`` go into [pgbouncer] verbatim and override the
    defaults. Clients authenticate with SCRAM and the cluster's password (found in the
    process's passfile); the Unix socket sits in the pooler's private directory."""
    if not binary.exists():
        raise ClusterError(f"{binary} not found (apt-get install pgbouncer)")
    if not cluster.password:
        raise ClusterError(f"PostgreSQL on port {cluster.port} has no password to pool with")
    user = run_as_user()
    basedir = Path(tempfile.mkdtemp(prefix="pg-watchdog-pgbouncer-", dir=base_dir)).resolve()
    pooler = TempPooler(basedir=basedir, port=_free_port(), os_user=user, listen_addr=listen_addr,
                        binary=binary, password=cluster.password)
    auth_type = (settings or {}).get("auth_type", "scram-sha-256")
    # With the verifier (as in pg_authid), a client's SCRAM proof gives PgBouncer the key to log
    # in to PostgreSQL. A client it lets in without SCRAM (trust, hba) gives it no key: then
    # PgBouncer needs the password itself.
    secret = cluster.scram_secret if auth_type in ("scram-sha-256", "md5") else cluster.password
    auth = basedir / "userlist.txt"
    fd = os.open(auth, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.writelines(f'"{u}" "{secret}"\n' for u in _AUTH_USERS)
    conf = {
        "listen_addr": listen_addr,
        "listen_port": str(pooler.port),
        "unix_socket_dir": str(basedir),
        "auth_type": "scram-sha-256",
        "auth_file": str(auth),
        "admin_users": "watchdog, postgres",
        "stats_users": "watchdog",
        "pool_mode": pool_mode,
        "default_pool_size": "20",
        "max_client_conn": "200",
        "server_idle_timeout": "600",
        "ignore_startup_parameters": "extra_float_digits",
        "pidfile": str(basedir / "pgbouncer.pid"),
        "logfile": str(pooler.log_path),
        **(settings or {}),
    }
    lines = ["[databases]", f"* = host={cluster.host} port={cluster.port}", "", "[pgbouncer]"]
    lines += [f"{k} = {v}" for k, v in conf.items()]
    pooler.ini.write_text("\n".join(lines) + "\n")
    try:
        if user:
            shutil.chown(basedir, user)
            for f in basedir.iterdir():
                shutil.chown(f, user)
        pooler.start()
        tempauth.remember(pooler.port, pooler.password, tempauth.listen_hosts(listen_addr))
    except BaseException:
        pooler.cleanup()
        raise
    return pooler
