"""`advise` finding: prepared transactions older than alerts.prepared_older_than.

The fix is a statement to review, never one pg-watchdog runs: only the application (or its
transaction manager) knows whether a prepared transaction must commit or roll back.
"""

from __future__ import annotations

from watchdog.commands.advise.findings import Finding
from watchdog.commands.advise.look import Look
from watchdog.config.units import format_duration
from watchdog.pg.prepared import stale
from watchdog.text import timestamps
from watchdog.text.quoting import quote_literal


def stale_prepared(look: Look, older_than: float) -> list[Finding]:
    """One finding per prepared transaction past ``older_than`` seconds."""
    found = []
    for x in stale(look.prepared, older_than):
        gid = quote_literal(x.gid)  # as the statement below spells it
        evidence = (
            f"prepared transaction {gid} (xid {x.xid}, owner {x.owner}, database"
            f" {x.database}) was prepared at {timestamps.shown(x.prepared)},"
            f" {format_duration(x.age_s)} ago (alerts.prepared_older_than is"
            f" {format_duration(older_than)})",
            f"it keeps its locks and holds back vacuum's xmin horizon ({x.xid_age} transactions"
            " so far) until it is committed or rolled back; no timeout ends it, transaction_timeout"
            " included",
        )
        fix = (
            f"Ask the application or transaction manager that prepared {gid} whether it will"
            " still finish it. If it is abandoned, review and run, connected to database"
            f" {look.ident(x.database)} as {look.ident(x.owner)} or a superuser:",
            f"  {x.rollback()}",
            "(or COMMIT PREPARED with the same name if its changes must stand; pg-watchdog never"
            " runs either)",
        )
        found.append(Finding("stale_prepared", "high", look.target,
                             f"prepared transaction {gid}", evidence, fix))
    return found
