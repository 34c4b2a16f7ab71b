"""One sweep of bench/mass_heal.py for one checkout of pg-watchdog, on a running server.

Run by mass_heal.py as a child process, so that several checkouts (``--watchdog-tree``) take
turns on the same server. Imports ``watchdog`` from TREE, connects as the service does and
warms the connection as a long-running service's is (statements prepared, array types
known), says ``ready``, waits for a line on stdin, runs one sweep with the audit log in
AUDIT_DIR and prints one JSON object. Not meant to be run by hand:

    python bench/heal_probe.py TREE POLICY_FILE
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

TREE = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(TREE))  # before any import of watchdog: measure that checkout's code

from watchdog.audit.log import AuditLog  # noqa: E402
from watchdog.config.policy import load_config  # noqa: E402
from watchdog.pg import queries  # noqa: E402
from watchdog.pg.connect import connect, server_address  # noqa: E402
from watchdog.pg.snapshot import take_snapshot  # noqa: E402
from watchdog.service import sweep  # noqa: E402


class TimedAudit(AuditLog):
    """The real audit log, noting when the intents and the final records reached the disk."""

    marks: dict[str, float]

    def write_intents(self, records: list[dict[str, Any]]) -> None:
        self.marks["intents_start"] = time.perf_counter()
        super().write_intents(records)
        self.marks["intents_done"] = time.perf_counter()

    def append(self, records: list[dict[str, Any]]) -> None:
        self.marks["append_start"] = time.perf_counter()
        super().append(records)
        self.marks["append_done"] = time.perf_counter()


async def main() -> dict[str, Any]:
    config = load_config(sys.argv[2])
    target = config.targets[0]
    audit = TimedAudit(config.audit.path)
    audit.marks = {}
    marks = audit.marks
    execute = sweep.execute

    async def timed_execute(*args: Any, **kw: Any) -> Any:
        marks["act_start"] = time.perf_counter()
        try:
            return await execute(*args, **kw)
        finally:
            marks["act_done"] = time.perf_counter()

    sweep.execute = timed_execute  # type: ignore[assignment]
    look, built = sweep.look, getattr(sweep, "_built", None)

    async def timed_look(*args: Any, **kw: Any) -> Any:
        try:
            return await look(*args, **kw)
        finally:
            marks["look_done"] = time.perf_counter()

    async def timed_built(*args: Any, **kw: Any) -> Any:
        marks.setdefault("built_start", time.perf_counter())
        try:
            assert built is not None
            return await built(*args, **kw)
        finally:
            marks.setdefault("built_done", time.perf_counter())

    sweep.look = timed_look  # type: ignore[assignment]
    if built is not None:  # records built off the loop: since 2026-11 (older: on the loop)
        sweep._built = timed_built  # type: ignore[assignment]
    conn = await connect(target)
    try:
        server = await server_address(conn)
        # As a service's connection after its first kills: each statement prepared once.
        await take_snapshot(conn, roles=config.member_roles())
        await conn.fetch(queries.STILL_THERE, [], [])
        await conn.fetch(queries.ACT, [], [], [], [], [])
        # As a service's audit log after its first kills: the log exists (the service checks
        # it at start), and so does this process's intent journal (empty, kept open).
        audit.check_writable()
        audit.write_intents([])
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.perf_counter()
        report = await sweep.sweep_target(conn, server, config, target, audit)
        end = time.perf_counter()
    finally:
        await conn.close()
        audit.close()
    outcomes = [o.outcome for o in report.outcomes]
    m = marks
    split = {}
    if "built_start" in m:
        split = {"decide": (m["built_start"] - m["look_done"]) * 1000,
                 "build": (m["built_done"] - m["built_start"]) * 1000}
    return {
        "tree": str(TREE),
        "terminated": outcomes.count("terminated"),
        "outcomes": len(outcomes),
        "records": len(config.audit.path.read_text().splitlines()),
        "look": (m["look_done"] - start) * 1000,
        **split,
        "to_intents": (m["intents_start"] - start) * 1000,
        "intents": (m["intents_done"] - m["intents_start"]) * 1000,
        "act": (m["act_done"] - m["act_start"]) * 1000,
        "to_final": (m["append_start"] - m["act_done"]) * 1000,
        "final": (m["append_done"] - m["append_start"]) * 1000,
        "total": (end - start) * 1000,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())), flush=True)
