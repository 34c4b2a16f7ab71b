"""The real client behind a backend: its pooler client's address when a pooler links one."""

from __future__ import annotations

from watchdog.core.model import PoolerLink, Session


def real_addr(session: Session, link: PoolerLink | None) -> str | None:
    """The address of the application behind ``session``: its pooler client's, else its own."""
    if link is not None and link.client is not None and link.client.addr is not None:
        return link.client.addr
    return session.client_addr


def describe_client(link: PoolerLink | None) -> str | None:
    """``10.2.3.4:51234 via pgb1``, ``pooled by pgb1 (no client)``, or None (not pooled)."""
    if link is None:
        return None
    if link.unknown is not None:
        return f"pooler {link.pooler} {link.unknown.value}: real client unknown"
    if link.client is None:
        return f"pooled by {link.pooler} (no client)"
    return f"{link.client.addr}:{link.client.port} via {link.pooler}"
