"""Connecting to a target: the monitoring connection's settings, and keeping secrets out of text."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

import asyncpg

from watchdog import queries
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
    from the userinfo and from a ``?password=`` parameter (libpq and asyncpg take both)."""
    try:
        parts = urlsplit(dsn)
        written = [parts.password or ""]
        query = parts.query
    except ValueError:  # e.g. an unclosed [ipv6 literal: fall back to a plain match
        m = _USERINFO_PASSWORD.match(dsn)
        written = [m.group(1)] if m else []
        query = dsn.partition("?")[2]
    written += _QUERY_PASSWORD.findall(query)
    forms = (form for pw in written for form in (pw, unquote(pw), unquote_plus(pw)))
    return [form for form in dict.fromkeys(forms) if form]


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ``***``."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return re.sub(r"([?&]password=)[^&]*", r"\1***", re.sub(r":[^:@/]*@", ":***@", dsn))
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(":" + parts.password + "@", ":***@", 1)
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


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
    elif isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return scrub(f"{target.name}: {reason}", secrets_of(target))


async def connect(target: Target, timeout: float = CONNECT_TIMEOUT) -> Any:
    """Open the monitoring connection to ``target``; TargetError (safe message) on failure."""
    try:
        password = read_password(target)
        conn = await asyncpg.connect(
            target.dsn or None,
            password=password,
            timeout=timeout,
            command_timeout=STATEMENT_TIMEOUT,
            server_settings=_SERVER_SETTINGS,
            # The snapshot query changes shape with the server; no point caching plans.
            statement_cache_size=16,
        )
    except TargetError:
        raise
    except Exception as exc:  # asyncpg raises many kinds; all mean "unreachable"
        raise TargetError(describe_error(target, exc)) from None
    return conn


async def server_address(conn: Any) -> str:
    """``host:port`` of the server as it sees itself."""
    return str(await conn.fetchval(queries.SERVER_ADDR))
