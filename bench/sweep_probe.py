"""One round of bench/sweep_cost.py for one checkout of pg-watchdog, on a running server.

Run by sweep_cost.py as a child process, so that several checkouts (``--watchdog-tree``)
take turns on the same server with the same idle sessions. Imports ``watchdog`` from TREE,
measures, prints one JSON object. Not meant to be run by hand:

    python bench/sweep_probe.py TREE WATCHDOG_DSN ADMIN_DSN RUNS [--pgss] [--profile]
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

TREE = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(TREE))  # before any import of watchdog: measure that checkout's code

import asyncpg  # noqa: E402

from watchdog.audit.log import AuditLog  # noqa: E402
from watchdog.config.policy import load_config  # noqa: E402
from watchdog.core.decide import decide  # noqa: E402
from watchdog.pg import queries  # noqa: E402
from watchdog.pg import snapshot as snapshot_module  # noqa: E402
from watchdog.pg.connect import connect, server_address  # noqa: E402
from watchdog.pg.snapshot import take_snapshot  # noqa: E402
from watchdog.service.sweep import sweep_target  # noqa: E402

BARE = "SELECT * FROM pg_stat_activity"


def snapshot_args(roles: tuple[str, ...]) -> list[Any]:
    """SNAPSHOT's parameters in this checkout (the names bound arrived with $2)."""
    args: list[Any] = [list(roles)]
    if "$2" in queries.SNAPSHOT:
        args.append(snapshot_module.ALL_NAMES_UP_TO)  # type: ignore[attr-defined]
    return args


async def samples_ms(fn: Callable[[], Awaitable[Any]], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - t) * 1000)
    return times


def _explained(rows: list[Any]) -> tuple[float, float]:
    """Planning and execution time (ms) from EXPLAIN ANALYZE's text."""
    plan = execution = 0.0
    for (line,) in rows:
        if line.startswith("Planning Time:"):
            plan = float(line.split()[2])
        elif line.startswith("Execution Time:"):
            execution = float(line.split()[2])
    return plan, execution


async def server_side(conn: Any, admin: Any, args: list[Any], runs: int, pgss: bool
                      ) -> dict[str, Any]:
    """What the server spends on SNAPSHOT and on the bare read: EXPLAIN ANALYZE (with output
    serialization on 17+) parsed anew as `once` does, and of the generic plan `run` ends up
    with; and pg_stat_statements' mean execution time over asyncpg's prepared statements."""
    version = int(await conn.fetchval("SHOW server_version_num"))
    opts = "ANALYZE, BUFFERS OFF, TIMING OFF" + (", SERIALIZE BINARY" if version >= 170000 else "")
    # EXPLAIN takes no bind parameters: the values go in as literals, quoted by the server.
    types = ", ".join(["text[]", "bigint"][: len(args)])
    values = ", ".join([await conn.fetchval("SELECT quote_literal($1::text[])", args[0]),
                        *(str(int(v)) for v in args[1:])])
    await conn.execute(f"PREPARE wd_bare AS {BARE}")
    await conn.execute(f"PREPARE wd_snap({types}) AS {queries.SNAPSHOT}")
    fresh: dict[str, list[float]] = {"bare": [], "snapshot": []}
    planning: dict[str, list[float]] = {"bare": [], "snapshot": []}
    generic: dict[str, list[float]] = {"bare": [], "snapshot": []}
    for mode, into in (("force_custom_plan", fresh), ("force_generic_plan", generic)):
        # Custom: planned anew at each EXPLAIN with the values bound, as `once` does (a
        # statement without parameters is never planned anew from a prepared one: the bare
        # read is explained as text).
        await conn.execute(f"SET plan_cache_mode = {mode}")
        bare = BARE if into is fresh else "EXECUTE wd_bare"
        for _ in range(runs):
            for name, execute in (("bare", bare), ("snapshot", f"EXECUTE wd_snap({values})")):
                plan, execution = _explained(await conn.fetch(f"EXPLAIN ({opts}) {execute}"))
                into[name].append(plan + execution)
                if into is fresh:
                    planning[name].append(plan)
    await conn.execute("RESET plan_cache_mode; DEALLOCATE wd_bare; DEALLOCATE wd_snap")
    out: dict[str, Any] = {"serialize": version >= 170000}
    for kind, values in (("fresh", fresh), ("planning", planning), ("generic", generic)):
        out[kind] = {k: statistics.median(v) for k, v in values.items()}
    if pgss:
        await admin.execute("SELECT pg_stat_statements_reset()")
        for _ in range(runs * 2):
            await conn.fetch(BARE)
            await conn.fetch(queries.SNAPSHOT, *args)
        head = queries.SNAPSHOT.strip().splitlines()[0]
        rows = await admin.fetch(
            "SELECT query, calls, total_exec_time FROM pg_stat_statements"
            " WHERE userid = (SELECT usesysid FROM pg_stat_activity WHERE pid = $1)",
            conn.get_server_pid(),
        )
        mean = {"bare": 0.0, "snapshot": 0.0}
        for r in rows:
            query = r["query"]
            name = "bare" if query == BARE else "snapshot" if query.startswith(head) else ""
            if name and r["calls"] >= runs:
                mean[name] = r["total_exec_time"] / r["calls"]
        out["pgss"] = mean
    return out


async def measure(dsn: str, admin_dsn: str, runs: int, pgss: bool, profile: bool
                  ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pgwd-probe-") as tmp:
        config = load_config(
            str(TREE / "policies" / "default.yaml"),
            environ={"PG_WATCHDOG_DSN": dsn, "PG_WATCHDOG_AUDIT": f"{tmp}/audit.jsonl",
                     "PG_WATCHDOG_DRY_RUN": "true"},
        )
        return await _measure(config, admin_dsn, runs, pgss, profile)


async def _measure(config: Any, admin_dsn: str, runs: int, pgss: bool, profile: bool
                   ) -> dict[str, Any]:
    target = config.targets[0]
    roles = config.member_roles()
    audit = AuditLog(config.audit.path)
    conn = await connect(target)
    admin = await asyncpg.connect(admin_dsn)
    server = await server_address(conn)

    async def bare() -> Any:
        return await conn.fetch(BARE)

    async def snapshot() -> Any:
        return await take_snapshot(conn, roles=roles)

    async def snap_decide() -> Any:
        return decide(await take_snapshot(conn, roles=roles), config, target.name, True, False)

    async def sweep() -> Any:
        report = await sweep_target(conn, server, config, target, audit, dry_run=True)
        assert not report.decision.actions
        return report

    try:
        steps = {"bare": bare, "snapshot": snapshot, "decide": snap_decide, "sweep": sweep}
        for fn in steps.values():  # warm up: prepared statements, generic plans, caches
            for _ in range(6):
                await fn()
        results: dict[str, list[float]] = {n: [] for n in steps}
        for _ in range(5):  # interleaved, so drift on the machine hits each alike
            for name, fn in steps.items():
                results[name] += await samples_ms(fn, max(runs // 5, 1))
        # Where the client's time goes: building Sessions, and deciding (both paths).
        args = snapshot_args(roles)
        raw = await conn.fetch(queries.SNAPSHOT, *args)
        snap = await take_snapshot(conn, roles=roles)
        parts: dict[str, list[float]] = {"sessions": [], "decide": [], "explain": []}
        for _ in range(runs):
            for name, call in (
                ("sessions", lambda: snapshot_module.sessions_from_rows(raw)),
                ("decide", lambda: decide(snap, config, target.name, True, False)),
                ("explain", lambda: decide(snap, config, target.name, True, True)),
            ):
                t = time.perf_counter()
                call()
                parts[name].append((time.perf_counter() - t) * 1000)
        server_cost = await server_side(conn, admin, args, runs, pgss)
        prof = None
        if profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(10):
                await sweep()
            pr.disable()
            out = io.StringIO()
            pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
            prof = out.getvalue()
        return {
            "tree": str(TREE),
            "rows": len(await bare()),
            "ms": {k: statistics.median(v) for k, v in results.items()},
            "min_ms": {k: min(v) for k, v in results.items()},
            "parts_ms": {k: statistics.median(v) for k, v in parts.items()},
            "server_ms": server_cost,
            "profile": prof,
        }
    finally:
        await admin.close()
        await conn.close()
        audit.close()


def main() -> None:
    _, _, dsn, admin_dsn, runs, *flags = sys.argv
    result = asyncio.run(measure(dsn, admin_dsn, int(runs), "--pgss" in flags,
                                 "--profile" in flags))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
