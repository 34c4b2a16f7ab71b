"""The DSN `pg-watchdog init` writes: the one it was given, without its secrets."""

from __future__ import annotations

import re
from urllib.parse import quote

from watchdog.config import conninfo

SECRETS = ("password", "sslpassword")
_PLAIN = re.compile(r"[^\s'\\]+")
_URI_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")


def _keyword_value(value: str) -> str:
    if _PLAIN.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _as_keywords(params: dict[str, str]) -> str:
    return " ".join(f"{k}={_keyword_value(v)}" for k, v in params.items())


def _as_uri(params: dict[str, str]) -> str:
    rest = dict(params)
    user = rest.pop("user", None)
    hosts = rest.get("host", "").split(",") if rest.get("host") else []
    shown = [f"[{h}]" if ":" in h else h for h in hosts]
    if hosts and all(_URI_HOST.fullmatch(h) for h in shown):
        ports = rest.pop("port", "").split(",") if rest.get("port") else []
        rest.pop("host")
        if len(ports) == 1 and len(shown) > 1:
            ports *= len(shown)
        if ports:
            shown = [f"{h}:{p}" if p else h for h, p in zip(shown, ports, strict=True)]
        authority = ",".join(shown)
    else:
        authority = ""  # a socket directory, say: it goes in ?host=
    dbname = rest.pop("dbname", None)
    text = "postgresql://" + (quote(user, safe="") + "@" if user is not None else "")
    text += authority + ("/" + quote(dbname, safe="") if dbname is not None else "")
    if rest:
        text += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}"
                               for k, v in rest.items())
    return text


def without_secrets(dsn: str) -> tuple[str, tuple[str, ...]]:
    """``dsn`` with no password in it (same form, URI or key=value), and the keys removed.

    ConninfoError if it is no valid DSN. The result is checked to parse back to the same
    parameters; if the URI form cannot say them, key=value does.
    """
    params = {k: p.value for k, p in conninfo.validate(dsn).items()}
    removed = tuple(k for k in SECRETS if k in params)
    kept = {k: v for k, v in params.items() if k not in SECRETS}
    if conninfo.is_uri(dsn):
        text = _as_uri(kept)
        try:
            if {k: p.value for k, p in conninfo.validate(text).items()} == kept:
                return text, removed
        except conninfo.ConninfoError:
            pass
    text = _as_keywords(kept)
    assert {k: p.value for k, p in conninfo.validate(text).items()} == kept
    return text, removed
