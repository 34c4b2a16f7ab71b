"""Credentials of the throwaway servers (tempcluster, temppooler, demo): a random password per
cluster, its SCRAM verifier, and the process-wide passfile through which clients (asyncpg,
psql, psycopg, pg-watchdog subprocesses) find it, so that it never appears in a DSN, a policy
file or a log line.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import hmac
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# PostgreSQL's default, and the least RFC 7677 allows: pgjdbc refuses fewer ("iteration must
# be >= 4096"). Only the client pays it (one PBKDF2 per login); the server checks with HMACs.
SCRAM_ITERATIONS = 4096
LOOPBACK = ("127.0.0.1", "localhost")

# Every login role without a password gets the bootstrap superuser's verifier (the cluster's
# password), and so do the roles named in pg_watchdog.reset (a JSON array). It runs only as a
# superuser on a writable server, and no secret is in its text: the server log may show it.
SYNC_PASSWORDS = """
DO $pg_watchdog$
DECLARE
    secret text;
    name text;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       OR current_setting('transaction_read_only') = 'on' THEN
        RETURN;
    END IF;
    SELECT rolpassword INTO secret FROM pg_authid WHERE oid = 10;
    FOR name IN
        SELECT rolname::text FROM pg_authid WHERE rolcanlogin AND rolpassword IS NULL
        UNION
        SELECT json_array_elements_text(
            coalesce(nullif(current_setting('pg_watchdog.reset', true), ''), '[]')::json)
    LOOP
        EXECUTE format('ALTER ROLE %I PASSWORD %L', name, secret);
    END LOOP;
END
$pg_watchdog$;
"""


def new_password() -> str:
    """A random password for one throwaway server."""
    return secrets.token_urlsafe(32)


def scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (``pg_authid``): made
    here, so that a cluster's PgBouncer holds the same one and can pass a client's key on."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def listen_hosts(addresses: str) -> tuple[str, ...]:
    """Host names a client may use for a server listening on ``addresses`` (a comma-separated
    listen_addresses / listen_addr value): each address, and localhost for the loopback."""
    found = [a.strip() for a in addresses.strip("'").split(",") if a.strip()]
    hosts = [a for a in found if a not in ("*", "0.0.0.0", "::")]
    if len(hosts) < len(found):  # a wildcard: clients reach it through the loopback
        hosts.append("127.0.0.1")
    if "127.0.0.1" in hosts:
        hosts.append("localhost")
    return tuple(dict.fromkeys(hosts))


@dataclass
class _Entry:
    hosts: tuple[str, ...]
    password: str
    roles: dict[str, str] = field(default_factory=dict)  # roles with a password of their own


_lock = threading.Lock()
_dir: Path | None = None
_owner = os.getpid()  # a forked child must not remove its parent's directory at exit
_entries: dict[int, _Entry] = {}  # by port


def _escape(field: str) -> str:
    return field.replace("\\", "\\\\").replace(":", "\\:")


def passfile() -> Path:
    """This process's passfile (0600, in a private 0700 directory made on first use and
    removed at exit), exported as PGPASSFILE to this process and its children."""
    global _dir
    with _lock:
        if _dir is None:
            _dir = Path(tempfile.mkdtemp(prefix="pg-watchdog-pass-"))
            _write()
        path = _dir / "pgpass"
    os.environ["PGPASSFILE"] = str(path)
    # libpq and asyncpg prefer PGPASSWORD to any passfile: one set for another server would
    # be sent to ours instead.
    os.environ.pop("PGPASSWORD", None)
    return path


def _write() -> None:
    """Replace the passfile atomically (readers see the old or the new one, never half)."""
    assert _dir is not None
    lines = []
    for port, entry in _entries.items():
        for host in map(_escape, entry.hosts):
            # The first matching line wins: a role's own password before the server's.
            lines += [f"{host}:{port}:*:{_escape(role)}:{_escape(password)}\n"
                      for role, password in entry.roles.items()]
            lines.append(f"{host}:{port}:*:*:{_escape(entry.password)}\n")
    tmp = _dir / f"pgpass.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, _dir / "pgpass")


def remember(port: int, password: str, hosts: Iterable[str] = LOOPBACK) -> None:
    """Clients of this process connecting to ``hosts``:``port`` use ``password``."""
    passfile()
    with _lock:
        old = _entries.get(port)  # a restart keeps the roles' own passwords
        roles = old.roles if old is not None and old.password == password else {}
        _entries[port] = _Entry(tuple(hosts), password, roles)
        _write()


def remember_role(port: int, role: str, password: str | None) -> None:
    """``role`` logs in to ``port`` with a ``password`` of its own (None: the server's again)."""
    if "\n" in role or "\r" in role:
        raise ValueError(f"a passfile cannot name the role {role!r}")
    with _lock:
        entry = _entries.get(port)
        if entry is None:
            raise ValueError(f"no server remembered on port {port}")
        if password is None:
            entry.roles.pop(role, None)
        else:
            entry.roles[role] = password
        _write()


def forget(port: int, password: str | None = None) -> None:
    """Drop ``port`` (if it still has ``password``): ports are reused by later servers."""
    with _lock:
        entry = _entries.get(port)
        if entry is None or password not in (None, entry.password):
            return
        del _entries[port]
        _write()


def password_for(port: int) -> str | None:
    """The server's password remembered for ``port`` (e.g. for a proxy in front of it)."""
    with _lock:
        entry = _entries.get(port)
        return entry.password if entry else None


@atexit.register
def _remove() -> None:
    if _dir is not None and os.getpid() == _owner:
        shutil.rmtree(_dir, ignore_errors=True)
