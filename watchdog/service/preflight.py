"""What must hold before the service acts on a policy file: checked at a start and again,
the same way, before a reload is applied (a reload that could not start is rejected whole)."""

from __future__ import annotations

from watchdog.audit.log import AuditLog
from watchdog.config.policy import Config
from watchdog.pgbouncer.console import psycopg_missing


class PreflightError(Exception):
    """The file is valid but cannot run on this install; the message is one line."""


def require(config: Config) -> None:
    """PreflightError if ``config`` needs what this install lacks (psycopg for poolers)."""
    if (missing := psycopg_missing(config)) is not None:
        # Without it no pooled backend is recognised, and the pool's idle ones look leaked.
        raise PreflightError(missing)


def open_audit(config: Config, running: AuditLog | None = None) -> AuditLog:
    """The audit log ``config`` names (``running`` if it is the same path), with what dead
    processes left settled and a write proven possible; AuditError if not. Blocking I/O."""
    audit = running if running is not None and running.path == config.audit.path else None
    audit = audit or AuditLog(config.audit.path)
    audit.recover()
    audit.check_writable()
    return audit
