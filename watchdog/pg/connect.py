"""Connecting to a target: the monitoring connection's settings, and keeping secrets out of text."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

import asyncpg

from watchdog.config import conninfo
from watchdog.config.policy import Target
from watchdog.core.model import APPLICATION_NAME
from watchdog.pg import queries
from watchdog.text.errors import reason as error_reason

CONNECT_TIMEOUT = 5.0
STATEMENT_TIMEOUT = 10.0
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 10000

# The held connection must never be killed by the server's own session timeouts.
_SERVER_SETTINGS = {
    "application_name": APPLICATION_NAME,
    "idle_session_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    "statement_timeout": "0",
    "lock_timeout": "0",
    "jit": "off",
    # A silent client (partition, dead host) must not keep its backend, and with it the
    # leader lock, for the kernel's default two hours. Idle link: probes from 5 s, every
    # 2 s, 3 unanswered -> dropped at 5 + 3 * 2 = 11 s. Unacknowledged data (a result
    # sent into the void): dropped after 10 s. Either way the lock is free within ~11 s.
    "tcp_keepalives_idle": str(KEEPALIVE_IDLE),
    "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL),
    "tcp_keepalives_count": str(KEEPALIVE_COUNT),
    "tcp_user_timeout": str(USER_TIMEOUT_MS),
}


class TargetError(Exception):
    """A target cannot be reached or used; the message is safe to print.

    ``report``: what a sweep interrupted by it had done already (signals that may have gone
    out, recorded as such), for alerts and metrics; None when it signalled nothing.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


_QUERY_PASSWORD = re.compile(r"(?:^|&)password=([^&]*)")
_USERINFO_PASSWORD = re.compile(r"^[^:/]+://[^:@/]*:([^@/]*)@")


def dsn_passwords(dsn: str) -> list[str]:
    """The DSN's passwords in every form a message could show them: as written and decoded,
    from a URI's userinfo or ``?password=`` parameter, or a key=value string's ``password``."""
    written = conninfo.passwords(dsn)
    if conninfo.is_uri(dsn):
        try:
            parts = urlsplit(dsn)
            written.append(parts.password or "")
            query = parts.query
        except ValueError:  # e.g. an unclosed [ipv6 literal: fall back to a plain match
            m = _USERINFO_PASSWORD.match(dsn)
            written += [m.group(1)] if m else []
            query = dsn.partition("?")[2]
        written += _QUERY_PASSWORD.findall(query)
    forms = (form for pw in written for form in (pw, unquote(pw), unquote_plus(pw)))
    return [form for form in dict.fromkeys(forms) if form]


def read_password(target: Target) -> str | None:
    """The password from ``password_file``, if the target names one."""
    if target.password_file is None:
        return None
    try:
        return Path(target.password_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise TargetError(
            f"{target.name}: cannot read password_file {target.password_file}: {error_reason(exc)}"
        ) from None
    except UnicodeDecodeError:
        # Never quote the decoder's message: it carries bytes of the password.
        raise TargetError(
            f"{target.name}: cannot read password_file {target.password_file}: not UTF-8 text"
        ) from None


def secrets_of(target: Target) -> list[str]:
    """Every secret string of a target, to scrub from any text shown to anyone."""
    found: list[str | None] = [*dsn_passwords(target.dsn)]
    found += [pw for pooler in target.poolers for pw in dsn_passwords(pooler.dsn)]
    with contextlib.suppress(TargetError):
        found.append(read_password(target))
    return [s for s in found if s]


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for s in secrets:
        text = text.replace(s, "***")
    return text


_SSL_NOISE = re.compile(r"^\[SSL(?:: [A-Z_]+)?\] | \(_ssl\.c:\d+\)$")


def _tls_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        why = str(exc.verify_message).rstrip(".")
        if why[1:2].islower():  # "Hostname mismatch", not "IP address mismatch"
            why = why[:1].lower() + why[1:]
        return f"TLS: certificate verify failed: {why}"
    return f"TLS: {_SSL_NOISE.sub('', str(exc.strerror or exc.reason or exc))}"


def describe_error(target: Target, exc: BaseException) -> str:
    """One safe line about why ``target`` failed."""
    if isinstance(exc, TargetError):
        return str(exc)  # already safe, and already names the target
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        reason = (
            f"server full, no slot for the watchdog ({exc}); on PostgreSQL 16+ set "
            "reserved_connections and GRANT pg_use_reserved_connections to the watchdog role; "
            "on 15 keep pg-watchdog running so its connection is already held when the server fills"
        )
    elif isinstance(exc, ssl.SSLError):
        reason = _tls_reason(exc)
    else:
        reason = error_reason(exc)
    return scrub(f"{target.name}: {reason}", secrets_of(target))


def _check_tls_files(target: Target, files: dict[str, str]) -> None:
    """Name a certificate or key file that cannot be read (asyncpg's error would not)."""
    for key, path in files.items():
        try:
            Path(path).expanduser().open("rb").close()
        except OSError as exc:
            raise TargetError(
                f"{target.name}: TLS: cannot read {key} {path}: {error_reason(exc)}"
            ) from None


async def connect(
    target: Target, timeout: float | None = None, settings: dict[str, str] | None = None
) -> Any:
    """Open the monitoring connection to ``target``; TargetError (safe message) on failure.

    The timeout is ``timeout``, else the DSN's connect_timeout, else CONNECT_TIMEOUT.
    ``settings``: session settings to send instead of the watchdog's own (``advise`` reads the
    server's timeouts, which the watchdog's own session overrides).
    """
    try:
        args = conninfo.connect_args(target.dsn)
        await asyncio.to_thread(_check_tls_files, target, args.tls_files)
        kwargs = dict(args.kwargs)
        if args.system_ca:
            kwargs["ssl"] = await asyncio.to_thread(conninfo.system_tls_context, args)
        password = read_password(target)
        if password is not None:
            kwargs["password"] = password
        conn = await asyncpg.connect(
            args.dsn,
            **kwargs,
            timeout=timeout if timeout is not None else args.timeout or CONNECT_TIMEOUT,
            command_timeout=STATEMENT_TIMEOUT,
            server_settings=_SERVER_SETTINGS if settings is None else settings,
            # The snapshot query changes shape with the server; no point caching plans.
            statement_cache_size=16,
        )
    except TargetError:
        raise
    except conninfo.ConninfoError as exc:  # load_config validated it: only a changed file
        raise TargetError(f"{target.name}: dsn: {exc.message}") from None
    except Exception as exc:  # asyncpg raises many kinds; all mean "unreachable"
        raise TargetError(describe_error(target, exc)) from None
    keep_alive(conn)
    return conn


def keep_alive(conn: Any) -> None:
    """The same keepalive and user timeout on our end of the socket as on the server's.

    asyncpg has no option for it. Without it a silent network is noticed only by the
    next sweep's timeout; with it the kernel closes the socket within ~11 s even between
    sweeps, so `up` and the leader gauge say the truth and the next sweep reconnects at
    once. Best effort: a Unix socket, or an asyncpg without ``_transport``, keeps defaults.
    """
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


async def server_address(conn: Any) -> str:
    """``host:port`` of the server as it sees itself."""
    return str(await conn.fetchval(queries.SERVER_ADDR))


async def open_target(
    target: Target, timeout: float | None = None, settings: dict[str, str] | None = None
) -> tuple[Any, str]:
    """The connection to ``target`` and the server's ``host:port``; TargetError on failure
    (a connection opened before the failure is dropped)."""
    conn = await connect(target, timeout, settings)
    try:
        return conn, await server_address(conn)
    except BaseException as exc:
        # Cancelled (shutdown, a reload, a timeout around us) as well as failed: nobody else
        # holds this connection yet, so it goes here or leaks a server slot.
        conn.terminate()
        if not isinstance(exc, Exception):
            raise
        raise TargetError(describe_error(target, exc)) from None


async def close_quietly(conn: Any) -> None:
    """Close ``conn`` politely within 2 s, else drop it; raises only a cancellation."""
    if conn is None or conn.is_closed():
        return
    try:
        await asyncio.wait_for(conn.close(), 2)
    except BaseException as exc:
        conn.terminate()
        if not isinstance(exc, Exception):
            raise  # cancelled: dropped all the same, and the cancellation goes on


@contextlib.asynccontextmanager
async def target_session(
    target: Target, settings: dict[str, str] | None = None
) -> AsyncIterator[tuple[Any, str]]:
    """``async with target_session(t) as (conn, server):`` open_target, then close_quietly."""
    conn, server = await open_target(target, settings=settings)
    try:
        yield conn, server
    finally:
        await close_quietly(conn)
