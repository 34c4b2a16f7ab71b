"""What every Python test app does: warm its pool, print the pids, wait for "go", serve 20 requests.

The test (tests/test_clients.py) reads the pids, has `pg-watchdog once` terminate them, then
writes "go". Each request is one query through the pool; a failed one is printed, never raised.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

REQUESTS = 20


def settings() -> tuple[str, int, str, str]:
    """The DSN, the pool size, the advised line (empty: none) and the naming line (empty: none)."""
    env = os.environ
    return (env["CLIENT_DSN"], int(env["CLIENT_POOL"]), env.get("CLIENT_RECIPE", ""),
            env.get("CLIENT_NAMING", ""))


def with_query(dsn: str, naming: str) -> str:
    """``dsn`` with the advised ``?application_name=...`` appended (libpq, asyncpg, SQLAlchemy)."""
    return dsn + naming if naming else dsn


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return json.dumps(f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}")


def wait_for_go() -> bool:
    return any(line.strip() == "go" for line in sys.stdin)


def run(warm: Callable[[int], list[int]], request: Callable[[], object], pool_size: int,
        close: Callable[[], object]) -> None:
    print("warm", *warm(pool_size), flush=True)
    if not wait_for_go():
        return
    ok = 0
    for i in range(1, REQUESTS + 1):
        try:
            request()
        except Exception as exc:
            print(f"request {i} failed {one_line(exc)}", flush=True)
        else:
            ok += 1
            print(f"request {i} ok", flush=True)
    print(f"done {ok} {REQUESTS - ok}", flush=True)
    close()
