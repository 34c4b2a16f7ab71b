"""Prepared transactions (PREPARE TRANSACTION) left behind: read, judged stale, never touched.

No server timeout ends a prepared transaction, and until someone commits or rolls it back it
keeps its locks and holds back vacuum's xmin horizon. `status` and `advise` show them; the
service reads them through a ``PreparedWatch``, at most once per interval per target, so the
sweeps themselves send nothing more. pg-watchdog never runs COMMIT or ROLLBACK PREPARED: only
the application or its transaction manager knows which outcome is right.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from watchdog.pg import queries
from watchdog.pg.connect import STATEMENT_TIMEOUT
from watchdog.pg.snapshot import server_text
from watchdog.text.quoting import quote_literal

log = logging.getLogger("watchdog.prepared")  # the name log filters know


@dataclass(frozen=True)
class PreparedXact:
    """One row of pg_prepared_xacts; ``age_s`` by the server's clock."""

    gid: str
    prepared: datetime
    owner: str
    database: str
    xid: str
    xid_age: int
    age_s: float

    @property
    def key(self) -> tuple[str, datetime]:
        """Identifies the transaction: a gid may be reused once the first one is finished."""
        return (self.gid, self.prepared)

    def rollback(self) -> str:
        """The statement a DBA may review and run, connected to ``database``."""
        return f"ROLLBACK PREPARED {quote_literal(self.gid)};"

    def as_json(self) -> dict[str, Any]:
        return {
            "gid": self.gid,
            "prepared": self.prepared.isoformat(),
            "owner": self.owner,
            "database": self.database,
            "xid": self.xid,
            "xid_age": self.xid_age,
            "age_s": round(self.age_s, 3),
        }


async def read_prepared(conn: Any, timeout: float) -> tuple[PreparedXact, ...]:
    """Every prepared transaction on the server, oldest first."""
    rows = await conn.fetch(queries.PREPARED_XACTS, timeout=timeout)
    return tuple(
        PreparedXact(
            gid=server_text(r["gid"]) or "",
            prepared=r["prepared"],
            owner=server_text(r["owner"]) or "",
            database=server_text(r["database"]) or "",
            xid=r["xid"],
            xid_age=int(r["xid_age"]),
            age_s=float(r["age_s"]),
        )
        for r in rows
    )


def stale(xacts: Iterable[PreparedXact], older_than: float) -> list[PreparedXact]:
    """The prepared transactions at least ``older_than`` seconds old."""
    return [x for x in xacts if x.age_s >= older_than]


class PreparedWatch:
    """Reads one target's prepared transactions at most once per ``every`` seconds."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._last = float("-inf")
        self._failing = False

    async def poll(
        self, conn: Any, every: float, timeout: float = STATEMENT_TIMEOUT
    ) -> tuple[PreparedXact, ...] | None:
        """The prepared transactions, or None when not due yet or unreadable (logged once)."""
        now = time.monotonic()
        if conn is None or conn.is_closed() or now - self._last < every:
            return None
        self._last = now
        try:
            found = await read_prepared(conn, timeout)
        except Exception as exc:  # never the sweep's trouble: the next sweep sees the server
            if not self._failing:
                log.warning("%s: cannot read pg_prepared_xacts: %s: %r", self.target,
                            type(exc).__name__, str(exc))
            self._failing = True
            return None
        self._failing = False
        return found
