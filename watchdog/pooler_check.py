"""`check --connect` for the PgBouncers of a target: can the watchdog read each admin console?"""

from __future__ import annotations

import asyncio
import contextlib

from watchdog import queries
from watchdog.config import PoolerConfig, Target
from watchdog.pooler import CONNECT_TIMEOUT, READ_TIMEOUT, connect_pooler, max_client_conn
from watchdog.pooler_watch import describe_pooler_error


async def check_pooler(target: Target, pooler: PoolerConfig) -> tuple[bool, str]:
    """(ok, one line) for one pooler: it connects and answers every SHOW the watchdog runs."""
    prefix = f"{target.name}: pooler {pooler.name}: "
    try:
        conn = await asyncio.wait_for(connect_pooler(pooler), CONNECT_TIMEOUT + 0.5)
    except Exception as exc:
        reason = describe_pooler_error(target.name, pooler, exc).removeprefix(prefix)
        return False, f"pooler {pooler.name}: cannot connect: {reason}"
    command = ""
    try:
        for command in queries.PGBOUNCER_CHECKS:
            async with conn.cursor() as cur:
                await asyncio.wait_for(cur.execute(command), READ_TIMEOUT)
        limit = await asyncio.wait_for(max_client_conn(conn), READ_TIMEOUT)
    except Exception as exc:
        reason = describe_pooler_error(target.name, pooler, exc).removeprefix(prefix)
        return False, (
            f"pooler {pooler.name}: connected, but {command or 'SHOW CONFIG'} failed: {reason}"
            " (put the role in PgBouncer's stats_users)"
        )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 2)
    return True, (
        f"pooler {pooler.name}: can run SHOW POOLS, SERVERS, CLIENTS and SOCKETS"
        f" (max_client_conn {limit})"
    )


async def check_poolers(target: Target) -> list[tuple[bool, str]]:
    """Every pooler of ``target``, concurrently."""
    return list(await asyncio.gather(*(check_pooler(target, p) for p in target.poolers)))
