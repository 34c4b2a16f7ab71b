"""Connecting to a target: the monitoring connection's settings, and keeping secrets out of text."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

import asyncpg

from watchdog import conninfo, queries
from watchdog.config import Target
from watchdog.model import APPLICATION_NAME

CONNECT_TIMEOUT = 5.0
STATEMENT_TIMEOUT = 10.0

# The held connection must never be killed by the server's own session timeouts.
_SERVER_SETTINGS = {
    "application_name": APPLICATION_NAME,
    "idle_session_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    "statement_timeout": "0",
    "lock_timeout": "0",
    "jit": "off",
}


class TargetError(Exception):
    """A target cannot be reached or used; the message is safe to print."""


_QUERY_PASSWORD = re.compile(r"(?:^|&)password=([^&]*)")
_USERINFO_PASSWORD = re.compile(r"^[^:/]+://[^:@/]*:([^@/]*)@")


def _dsn_passwords(dsn: str) -> list[str]:
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
            f"{target.name}: cannot read password_file {target.password_file}: {exc.strerror}"
        ) from None
    except UnicodeDecodeError:
        # Never quote the decoder's message: it carries bytes of the password.
        raise TargetError(
            f"{target.name}: cannot read password_file {target.password_file}: not UTF-8 text"
        ) from None


def secrets_of(target: Target) -> list[str]:
    """Every secret string of a target, to scrub from any text shown to anyone."""
    found: list[str | None] = [*_dsn_passwords(target.dsn)]
    found += [pw for pooler in target.poolers for pw in _dsn_passwords(pooler.dsn)]
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
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    elif isinstance(exc, asyncpg.TooManyConnectionsError):
        reason = (
            f"server full, no slot for the watchdog ({exc}); on PostgreSQL 16+ set "
            "reserved_connections and GRANT pg_use_reserved_connections to the watchdog role; "
            "on 15 keep pg-watchdog running so its connection is already held when the server fills"
        )
    elif isinstance(exc, ssl.SSLError):
        reason = _tls_reason(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return scrub(f"{target.name}: {reason}", secrets_of(target))


def _check_tls_files(target: Target, files: dict[str, str]) -> None:
    """Name a certificate or key file that cannot be read (asyncpg's error would not)."""
    for key, path in files.items():
        try:
            Path(path).expanduser().open("rb").close()
        except OSError as exc:
            raise TargetError(
                f"{target.name}: TLS: cannot read {key} {path}: {exc.strerror or exc}"
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
    return conn


async def server_address(conn: Any) -> str:
    """``host:port`` of the server as it sees itself."""
    return str(await conn.fetchval(queries.SERVER_ADDR))
