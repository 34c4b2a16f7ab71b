"""libpq connection strings (URIs and ``key=value`` lists) into asyncpg.connect arguments.

asyncpg passes URI parameters it does not know to the server as settings, and the server then
rejects the login; so every parameter is parsed and checked here, and asyncpg only ever gets
keyword arguments plus a URI made of the TLS parameters it reads itself.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")

# libpq parameters pg-watchdog hands to asyncpg, with the values it accepts (None: any text).
SUPPORTED: dict[str, tuple[str, ...] | None] = {
    "host": None,
    "port": None,
    "dbname": None,
    "user": None,
    "password": None,
    "passfile": None,
    "connect_timeout": None,
    "service": None,
    "servicefile": None,
    "target_session_attrs": SESSION_ATTRS,
    "sslmode": SSLMODES,
    "sslrootcert": None,
    "sslcert": None,
    "sslkey": None,
    "sslcrl": None,
    "sslpassword": None,
    "sslnegotiation": ("postgres", "direct"),
    "ssl_min_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "ssl_max_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "krbsrvname": None,
    "gsslib": ("gssapi", "sspi"),
}
# Read by asyncpg from the URI it gets (it has no keyword argument for them).
_TLS_URI_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "sslpassword",
                 "sslnegotiation", "ssl_min_protocol_version", "ssl_max_protocol_version")
_KWARGS = {"user": "user", "password": "password", "dbname": "database", "passfile": "passfile",
           "service": "service", "servicefile": "servicefile",
           "target_session_attrs": "target_session_attrs",
           "krbsrvname": "krbsrvname", "gsslib": "gsslib"}

_NAME_IS_OURS = ("pg-watchdog connects as application_name pg-watchdog: that is how it "
                 "recognises its own sessions")
# Valid libpq parameters that asyncpg does not implement, with what to do instead.
UNSUPPORTED = {
    "hostaddr": "asyncpg has no hostaddr: put the address in host=",
    "application_name": _NAME_IS_OURS,
    "fallback_application_name": _NAME_IS_OURS,
    "options": "set server settings with ALTER ROLE ... SET instead",
    "client_encoding": "asyncpg always uses UTF8",
    **dict.fromkeys(
        ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
         "tcp_user_timeout", "replication", "gssencmode", "requiressl", "sslcompression",
         "sslsni", "sslcertmode", "sslcrldir", "sslkeylogfile", "channel_binding",
         "require_auth", "requirepeer", "gssdelegation",
         "load_balance_hosts", "min_protocol_version", "max_protocol_version",
         "scram_client_key", "scram_server_key"),
        "",
    ),
}
_SUGGEST = {"database": "dbname", "db": "dbname", "username": "user", "ssl": "sslmode",
            "timeout": "connect_timeout", "pass": "password"}


class ConninfoError(Exception):
    """A bad connection string; ``offset`` is the index of the key at fault, if any."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.message, self.offset = message, offset


@dataclass(frozen=True)
class Param:
    value: str
    offset: int  # where its key is written in the string
    # The key came right after an unquoted password: it may be the password's second word.
    after_password: bool = False


def _show(text: str) -> str:
    """``text`` quoted for a one-line message."""
    return text if re.fullmatch(r"[\w.-]+", text, re.ASCII) else repr(text)


def is_uri(dsn: str) -> bool:
    return dsn.startswith(("postgresql://", "postgres://"))


def parse(dsn: str) -> dict[str, Param]:
    """The parameters of a URI or a ``key=value`` string (libpq's syntax; the last one wins)."""
    params = _parse_uri(dsn) if is_uri(dsn) else _parse_keywords(dsn)
    for key, param in params.items():
        _check(key, param)
    return params


def _parse_keywords(s: str) -> dict[str, Param]:
    """libpq's conninfo_parse(): ``key = value``, values in single quotes or with backslash
    escapes; like libpq, ``host= port=1`` gives host the value ``port=1``."""
    params: dict[str, Param] = {}
    i, n = 0, len(s)
    bare_password = False
    while True:
        while i < n and s[i].isspace():
            i += 1
        if i == n:
            return params
        start = i
        while i < n and s[i] != "=" and not s[i].isspace():
            i += 1
        key = s[start:i]
        while i < n and s[i].isspace():
            i += 1
        if i == n or s[i] != "=":
            # Not naming the word: it may be part of a password that has a space.
            raise ConninfoError('expected "=" after a parameter name (a DSN is key=value pairs '
                                "or a postgresql:// URI; quote a value with spaces: "
                                "key='a b')", start)
        i += 1
        while i < n and s[i].isspace():
            i += 1
        value: list[str] = []
        quoted = i < n and s[i] == "'"
        if quoted:
            i += 1
            while True:
                if i == n:
                    raise ConninfoError(f"{_show(key)}: unterminated quoted value", start)
                if s[i] == "\\" and i + 1 < n:
                    value.append(s[i + 1])
                    i += 2
                elif s[i] == "'":
                    i += 1
                    break
                else:
                    value.append(s[i])
                    i += 1
        else:
            while i < n and not s[i].isspace():
                if s[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(s[i])
                i += 1
        params[key] = Param("".join(value), start, bare_password)
        bare_password = key == "password" and not quoted


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _decode(text: str, offset: int, what: str) -> str:
    if _BAD_PERCENT.search(text):
        raise ConninfoError(f"{what}: invalid percent-encoding (% must be followed by two hex "
                            "digits)", offset)
    decoded = unquote(text, errors="strict")
    if "\0" in decoded:
        raise ConninfoError(f"{what}: contains a NUL character (%00)", offset)
    return decoded


def _parse_uri(s: str) -> dict[str, Param]:
    """``postgresql://[user[:password]@][host][:port][,...][/dbname][?key=value&...]``."""
    base = s.index("://") + 3
    rest = s[base:]
    q = rest.find("?")
    query_at = base + q + 1 if q >= 0 else -1
    main, query = (rest[:q], rest[q + 1:]) if q >= 0 else (rest, "")
    params: dict[str, Param] = {}
    slash = main.find("/")
    authority, path = (main[:slash], main[slash + 1:]) if slash >= 0 else (main, None)
    at = authority.rfind("@")
    if at >= 0:
        user, colon, password = authority[:at].partition(":")
        if user:
            params["user"] = Param(_decode(user, base, "user"), base)
        if colon:
            params["password"] = Param(_decode(password, base, "password"), base)
    hosts_at = base + at + 1
    hosts, ports = [], []
    # Nothing from the host part is echoed: with a '/', '?' or '@' left unencoded in a
    # password, what reads as a host or a port here is a piece of that password.
    if "@" in authority[at + 1:] or (path is not None and "@" in path):
        raise ConninfoError("'@' after the host part: percent-encode " + _ENCODE, hosts_at)
    for part in authority[at + 1:].split(",") if authority[at + 1:] else []:
        m = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*)(?::(.*))?", part)
        if m is None:
            raise ConninfoError("bad host (an IPv6 address goes in brackets: [::1]:5432;"
                                f" percent-encode {_ENCODE})", hosts_at)
        host = m.group(1)
        hosts.append(host[1:-1] if host.startswith("[") else _decode(host, hosts_at, "host"))
        ports.append(m.group(2) or "")
        if not _is_port(m.group(2) or "1"):
            raise ConninfoError(f"port: not a port number (1-65535); percent-encode {_ENCODE}",
                                hosts_at)
    if any(hosts):
        params["host"] = Param(",".join(hosts), hosts_at)
    if any(ports):
        params["port"] = Param(",".join(ports), hosts_at)
    if path:
        params["dbname"] = Param(_decode(path, base + slash + 1, "dbname"), base + slash + 1)
    offset = query_at
    for item in query.split("&") if query else []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConninfoError('expected "=" in a URI parameter (?key=value&key=value)', offset)
        key = _decode(key, offset, "parameter name")
        params[key] = Param(_decode(value, offset, key), offset)
        offset += len(item) + 1
    return params


_ENCODE = "'/', '?' and '@' in a user name or password (%2F, %3F, %40)"


def _is_port(text: str) -> bool:
    return re.fullmatch(r"[0-9]+", text) is not None and 1 <= int(text) <= 65535


def _check(key: str, param: Param) -> None:
    if "\0" in param.value:
        raise ConninfoError(f"{_show(key)}: contains a NUL character", param.offset)
    if param.after_password and key not in SUPPORTED and key not in UNSUPPORTED:
        raise ConninfoError("unknown connection parameter after password= (quote a password "
                            "that has spaces: password='a b')", param.offset)
    if key in UNSUPPORTED:
        hint = UNSUPPORTED[key]
        hint = hint or "asyncpg, which pg-watchdog connects with, has no equivalent"
        raise ConninfoError(f"{key}: not supported ({hint})", param.offset)
    if key not in SUPPORTED:
        hint = f" (did you mean {_SUGGEST[key]}?)" if key in _SUGGEST else ""
        raise ConninfoError(f"{_show(key)}: unknown connection parameter{hint}", param.offset)
    allowed, value = SUPPORTED[key], param.value
    if allowed is not None and value not in allowed:
        raise ConninfoError(f"{key}: {_show(value)} is not one of {', '.join(allowed)}",
                            param.offset)
    if key == "port":
        for port in value.split(","):
            if port and not _is_port(port):
                raise ConninfoError(f"port: {_show(port)} is not a port number", param.offset)
    if key == "connect_timeout" and not (re.fullmatch(r"[0-9]+", value) and int(value) > 0):
        raise ConninfoError(f"connect_timeout: {_show(value)} is not a positive whole number "
                            "of seconds", param.offset)


def _check_ports(params: Mapping[str, Param]) -> None:
    hosts = params["host"].value.split(",") if "host" in params else [""]
    if "port" in params:
        ports = params["port"].value.split(",")
        if len(ports) not in (1, len(hosts)):
            raise ConninfoError(f"port: {len(ports)} ports for {len(hosts)} hosts",
                                params["port"].offset)


def _check_system_ca(sslrootcert: str, sslmode: str | None, offset: int | None) -> None:
    # As libpq 16+: the operating system's CAs only make sense if the host name is checked.
    if sslrootcert == "system" and sslmode not in (None, "verify-full"):
        raise ConninfoError(f"sslrootcert=system needs sslmode=verify-full, not {sslmode}",
                            offset)


def validate(dsn: str) -> dict[str, Param]:
    """:func:`parse` plus the checks that need every parameter; ConninfoError if invalid."""
    params = parse(dsn)
    _check_ports(params)
    if "sslrootcert" in params:
        mode = params.get("sslmode")
        _check_system_ca(params["sslrootcert"].value, mode.value if mode else None,
                         (mode or params["sslrootcert"]).offset)
    return params


@dataclass(frozen=True)
class ConnectArgs:
    """What asyncpg.connect gets: ``dsn`` carries only TLS parameters asyncpg reads itself."""

    dsn: str
    kwargs: dict[str, Any]
    timeout: float | None
    sslmode: str
    tls_files: dict[str, str]  # sslrootcert/sslcert/sslkey/sslcrl to be loaded, from DSN or env
    # sslrootcert=system: the caller passes system_tls_context() as asyncpg's ``ssl``.
    system_ca: bool = False
    sslpassword: str = ""


_TLS_ENV = {"sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY",
            "sslcrl": "PGSSLCRL"}


def connect_args(dsn: str, environ: Mapping[str, str] | None = None) -> ConnectArgs:
    """asyncpg.connect arguments for ``dsn`` (empty: everything from the PG* environment)."""
    env = os.environ if environ is None else environ
    params = {k: p.value for k, p in validate(dsn).items()}
    kwargs: dict[str, Any] = {_KWARGS[k]: v for k, v in params.items() if k in _KWARGS}
    if "service" not in kwargs and env.get("PGSERVICE"):
        kwargs["service"] = env["PGSERVICE"]  # asyncpg reads PGSERVICE but never uses it
    if params.get("host"):
        kwargs["host"] = params["host"].split(",")
    ports = [p for p in params.get("port", "").split(",")]
    if any(ports):
        default = env.get("PGPORT", "5432")
        hosts = len(kwargs.get("host", [""]))
        ports = ports * hosts if len(ports) == 1 else ports
        kwargs["port"] = [int(p or default) for p in ports]
    tls = {k: params[k] for k in _TLS_URI_KEYS if params.get(k)}
    files = {k: params.get(k) or env.get(var, "") for k, var in _TLS_ENV.items()}
    system_ca = files["sslrootcert"] == "system"
    explicit_mode = tls.get("sslmode") or env.get("PGSSLMODE")
    if system_ca:
        _check_system_ca("system", explicit_mode, None)
        files.pop("sslrootcert")
        # asyncpg cannot load the system store: it gets our context, and no TLS URI keys.
        tls = {k: v for k, v in tls.items() if k in ("sslnegotiation",)}
    sslmode = "verify-full" if system_ca else explicit_mode or "prefer"
    if sslmode == "disable":
        files = {}
    elif sslmode in ("allow", "prefer"):  # asyncpg verifies nothing then, nor loads the CA
        files = {k: v for k, v in files.items() if k in ("sslcert", "sslkey")}
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in tls.items())
    timeout = float(params["connect_timeout"]) if "connect_timeout" in params else None
    return ConnectArgs(dsn="postgresql://" + (f"?{query}" if query else ""), kwargs=kwargs,
                       timeout=timeout, sslmode=sslmode,
                       tls_files={k: v for k, v in files.items() if v}, system_ca=system_ca,
                       sslpassword=params.get("sslpassword", ""))


_TLS_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
                 "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def system_tls_context(args: ConnectArgs) -> ssl.SSLContext:
    """For sslrootcert=system: verify-full against the operating system's CAs (blocking I/O)."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # asyncpg's and libpq's default
    if cert := args.tls_files.get("sslcert"):
        ctx.load_cert_chain(cert, args.tls_files.get("sslkey") or None,
                            password=lambda: args.sslpassword)
    return ctx


def passwords(dsn: str) -> list[str]:
    """The secrets a DSN carries (password, sslpassword), decoded and as written."""
    try:
        params = parse(dsn)
    except ConninfoError:
        return []
    found = []
    for key in ("password", "sslpassword"):
        if value := params[key].value if key in params else "":
            escaped = value.replace("\\", "\\\\").replace("'", "\\'")  # in key=value form
            found += [value, escaped, quote(value, safe=""), quote(value)]
    return found
