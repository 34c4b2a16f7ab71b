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
from pathlib import Path

# Iterations stretch guessable passwords; these are 256 random bits that nobody types, so
# stretching buys nothing and would cost every test connection a PBKDF2 on both sides
# (PostgreSQL's default is 4096).
SCRAM_ITERATIONS = 1
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
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (``pg_authid``): set as
    is, it also fixes the iteration count, which PostgreSQL 15 cannot configure."""
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


_lock = threading.Lock()
_dir: Path | None = None
_owner = os.getpid()  # a forked child must not remove its parent's directory at exit
_entries: dict[int, tuple[tuple[str, ...], str]] = {}  # port -> (hosts, password)


def _escape(field: str) -> str:
    return field.replace("\\", "\\\\").replace(":", "\\:")


def _export(path: Path) -> None:
    os.environ["PGPASSFILE"] = str(path)
    # libpq and asyncpg prefer PGPASSWORD to any passfile: one set for another server would
    # be sent to ours instead.
    os.environ.pop("PGPASSWORD", None)


def passfile() -> Path:
    """This process's passfile (0600, in a private 0700 directory made on first use and
    removed at exit), exported as PGPASSFILE to this process and its children."""
    global _dir
    with _lock:
        if _dir is None:
            _dir = Path(tempfile.mkdtemp(prefix="pg-watchdog-pass-"))
            _write()
        path = _dir / "pgpass"
        _export(path)
        return path


def _write() -> None:
    """Replace the passfile atomically (readers see the old or the new one, never half)."""
    assert _dir is not None
    lines = [f"{_escape(host)}:{port}:*:*:{_escape(password)}\n"
             for port, (hosts, password) in _entries.items() for host in hosts]
    tmp = _dir / f"pgpass.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, _dir / "pgpass")


def remember(port: int, password: str, hosts: Iterable[str] = LOOPBACK) -> None:
    """Clients of this process connecting to ``hosts``:``port`` use ``password``."""
    path = passfile()
    with _lock:
        _entries[port] = (tuple(hosts), password)
        _write()
    _export(path)


def forget(port: int, password: str | None = None) -> None:
    """Drop ``port`` (if it still has ``password``): ports are reused by later servers."""
    with _lock:
        entry = _entries.get(port)
        if _dir is None or entry is None or password not in (None, entry[1]):
            return
        del _entries[port]
        _write()


def password_for(port: int) -> str | None:
    """The password remembered for ``port`` (e.g. for a proxy in front of that server)."""
    with _lock:
        entry = _entries.get(port)
        return entry[1] if entry else None


@atexit.register
def _remove() -> None:
    if _dir is not None and os.getpid() == _owner:
        shutil.rmtree(_dir, ignore_errors=True)
