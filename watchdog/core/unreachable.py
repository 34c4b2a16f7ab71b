"""Policies the exclusions keep from ever acting: found from the policy file alone, no server."""

from __future__ import annotations

from fnmatch import fnmatchcase

from watchdog.config.policy import PROVIDER_ADMIN_ROLES, Config
from watchdog.config.yamlfields import Network

_GLOB_CHARS = frozenset("*?[")


def _spared(pattern: str, excluded: tuple[str, ...]) -> bool:
    """Whether every name ``pattern`` matches is also matched by one of ``excluded``.

    Exact for a plain name; a glob counts as spared only by the same glob or ``*``.
    """
    if _GLOB_CHARS.isdisjoint(pattern):
        return any(fnmatchcase(pattern, e) for e in excluded)
    return pattern in excluded or "*" in excluded


def _within(net: Network, excluded: tuple[Network, ...]) -> bool:
    return any(net.version == e.version and net.subnet_of(e) for e in excluded)  # type: ignore[arg-type]


def never_acts(config: Config) -> list[str]:
    """One line for each policy whose filters select only sessions the exclusions spare."""
    found: list[str] = []
    g = config.exclude
    for p in config.policies:
        own = p.exclude
        why = None
        if p.member_of and set(p.member_of) <= {*g.member_of, *own.member_of}:
            why = f"every role its member_of selects ({', '.join(p.member_of)}) is spared by" \
                  " exclude.member_of"
            if set(p.member_of) & set(g.member_of) and g.member_of == PROVIDER_ADMIN_ROLES:
                why += ", which lists the managed services' admin roles unless the file sets it"
        else:
            for key in ("users", "applications", "databases"):
                wanted: tuple[str, ...] = getattr(p, key)
                excluded = (*getattr(g, key), *getattr(own, key))
                if wanted and all(_spared(w, excluded) for w in wanted):
                    why = f"every name its {key} selects ({', '.join(wanted)}) is spared by" \
                          f" exclude.{key}"
                    break
            nets = (*g.client_addrs, *own.client_addrs)
            if why is None and p.client_addrs and all(_within(n, nets) for n in p.client_addrs):
                shown = ", ".join(str(n) for n in p.client_addrs)
                why = f"every address its client_addrs selects ({shown}) is spared by" \
                      " exclude.client_addrs"
        if why is not None:
            found.append(f"policy {p.name!r} never acts: {why}")
    return found
