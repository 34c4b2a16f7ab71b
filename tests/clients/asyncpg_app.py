"""asyncpg test app: an asyncpg Pool of CLIENT_POOL connections, its event loop running
throughout (as in any asyncio service), so the pool sees a terminated connection close."""

from __future__ import annotations

import asyncio
import functools
import sys
import types

import asyncpg
from protocol import REQUESTS, one_line, settings, with_query


async def main() -> None:
    dsn, size, recipe, naming = settings()
    dsn = with_query(dsn, naming)
    # The app's own sizing; the advised line (an asyncpg.create_pool call) adds its settings.
    sized = functools.partial(asyncpg.create_pool, min_size=size, max_size=size)
    shim = types.SimpleNamespace(create_pool=sized)
    pool = await (eval(recipe, {"asyncpg": shim, "dsn": dsn}) if recipe else sized(dsn))
    conns = [await pool.acquire() for _ in range(size)]
    pids = [c.get_server_pid() for c in conns]
    for c in conns:
        await pool.release(c)
    print("warm", *pids, flush=True)
    loop = asyncio.get_running_loop()
    while (line := await loop.run_in_executor(None, sys.stdin.readline)) and line.strip() != "go":
        pass
    if not line:
        return
    ok = 0
    for i in range(1, REQUESTS + 1):
        try:
            await pool.fetchval("SELECT 1")
        except Exception as exc:
            print(f"request {i} failed {one_line(exc)}", flush=True)
        else:
            ok += 1
            print(f"request {i} ok", flush=True)
    print(f"done {ok} {REQUESTS - ok}", flush=True)
    await pool.close()


asyncio.run(main())
