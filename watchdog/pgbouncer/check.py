"""`check --connect` for the PgBouncers of a target: can the watchdog read each admin console?"""

from __future__ import annotations

import asyncio

from watchdog.config.policy import PoolerConfig, Target
from watchdog.pgbouncer import rows as shapes
from watchdog.pgbouncer.console import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    connect_pooler,
    max_client_conn,
)
from watchdog.pgbouncer.read import Caps, show
from watchdog.pgbouncer.rows import AnswerError
from watchdog.pgbouncer.watch import describe_pooler_error


async def check_pooler(target: Target, pooler: PoolerConfig) -> tuple[bool, str]:
    """(ok, one line) for one pooler: it connects and answers every SHOW the watchdog runs."""
    prefix = f"{target.name}: pooler {pooler.name}: "
    try:
        conn = await asyncio.wait_for(connect_pooler(pooler), CONNECT_TIMEOUT + 0.5)
    except Exception as exc:
        reason = describe_pooler_error(target.name, pooler, exc).removeprefix(prefix)
        return False, f"pooler {pooler.name}: cannot connect: {reason}"
    command = "SHOW CONFIG"
    try:
        limit = await asyncio.wait_for(max_client_conn(conn), READ_TIMEOUT)
        # Every answer is read as the service reads it: bounded, each row checked.
        for shape in (shapes.POOLS, shapes.LISTS, shapes.SOCKETS):
            command = shape.command
            await asyncio.wait_for(show(conn, shape, Caps.for_clients(limit)), READ_TIMEOUT)
    except AnswerError as exc:
        return False, f"pooler {pooler.name}: connected, but {exc}"
    except Exception as exc:
        reason = describe_pooler_error(target.name, pooler, exc).removeprefix(prefix)
        return False, (
            f"pooler {pooler.name}: connected, but {command} failed: {reason}"
            " (put the role in PgBouncer's stats_users)"
        )
    finally:
        await conn.close()
    return True, (
        f"pooler {pooler.name}: can run SHOW POOLS, LISTS and SOCKETS"
        f" (max_client_conn {limit})"
    )


async def check_poolers(target: Target) -> list[tuple[bool, str]]:
    """Every pooler of ``target``, concurrently."""
    return list(await asyncio.gather(*(check_pooler(target, p) for p in target.poolers)))
