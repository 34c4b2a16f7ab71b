"""SQLAlchemy 2 (psycopg 3 driver) test app: a QueuePool of CLIENT_POOL connections."""

from __future__ import annotations

import functools

from protocol import run, settings, with_query
from sqlalchemy import create_engine, text

dsn, size, recipe, naming = settings()
url = with_query(dsn.replace("postgresql://", "postgresql+psycopg://", 1), naming)
# The app's own sizing; the advised line (a create_engine call) adds its settings to it.
sized = functools.partial(create_engine, pool_size=size, max_overflow=0)
engine = eval(recipe, {"create_engine": sized, "url": url}) if recipe else sized(url)


def warm(n: int) -> list[int]:
    conns = [engine.connect() for _ in range(n)]
    pids = [int(c.execute(text("SELECT pg_backend_pid()")).scalar_one()) for c in conns]
    for c in conns:
        c.close()
    return pids


def request() -> None:
    with engine.connect() as c:
        c.execute(text("SELECT 1")).scalar_one()


run(warm, request, size, engine.dispose)
