"""Shared fixtures: real throwaway PostgreSQL clusters (never a mock of the database).

``pg`` is one module-scoped cluster per major (ids ``pg15`` to ``pg18``); set
``PG_WATCHDOG_TEST_MAJORS=15`` (or ``15,18``) to restrict the majors. ``pgbouncer`` is the
binary of each PgBouncer version (ids ``pgbouncer1.18``, ``pgbouncer1.24``), restricted by
``PG_WATCHDOG_TEST_PGBOUNCERS=1.24``. A server that cannot start fails the test with the
ClusterError message; it is never skipped. TCP logins to these servers need their random
passwords: every client finds them through PGPASSFILE, exported here before any test module
copies the environment (see watchdog.commands.demo.tempauth).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import asyncpg
import pytest
from helpers import connect
from scenario import kill_leftovers, setup_roles
from temppooler import find_pgbouncer

from watchdog.commands.demo.tempauth import passfile
from watchdog.commands.demo.tempcluster import (
    ClusterError,
    TempCluster,
    find_bindir,
    run_as_user,
    start_cluster,
)

passfile()

DEFAULT_MAJORS = (15, 16, 17, 18)
DEFAULT_PGBOUNCERS = ("1.18", "1.24")


def selected_majors() -> list[int]:
    """Majors under test, from $PG_WATCHDOG_TEST_MAJORS (default 15,16,17,18)."""
    raw = os.environ.get("PG_WATCHDOG_TEST_MAJORS", "").strip()
    if not raw:
        return list(DEFAULT_MAJORS)
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise pytest.UsageError(f"bad PG_WATCHDOG_TEST_MAJORS={raw!r} (want e.g. 15,18)") from None


def selected_pgbouncers() -> list[str]:
    """PgBouncer versions under test, from $PG_WATCHDOG_TEST_PGBOUNCERS (default 1.18,1.24)."""
    raw = os.environ.get("PG_WATCHDOG_TEST_PGBOUNCERS", "").strip()
    versions = [part.strip() for part in raw.split(",") if part.strip()]
    if raw and not all(re.fullmatch(r"\d+\.\d+", v) for v in versions):
        raise pytest.UsageError(f"bad PG_WATCHDOG_TEST_PGBOUNCERS={raw!r} (want e.g. 1.18,1.24)")
    return versions or list(DEFAULT_PGBOUNCERS)


MAJORS = selected_majors()
PGBOUNCERS = selected_pgbouncers()


def pytest_report_header() -> list[str]:
    lines = []
    for major in MAJORS:
        for tls in (False, True):
            what = f"PostgreSQL {major}{' with OpenSSL (TLS tests)' if tls else ''}"
            try:
                lines.append(f"{what}: {find_bindir(major, with_openssl=tls)}")
            except ClusterError as exc:
                lines.append(f"{what}: MISSING ({exc})")
    for version in PGBOUNCERS:
        try:
            lines.append(f"PgBouncer {version}: {find_pgbouncer(version)}")
        except ClusterError as exc:
            lines.append(f"PgBouncer {version}: MISSING ({exc})")
    return [*lines, f"PostgreSQL runs as OS user: {run_as_user() or 'current user'}"]


def _start(major: int, max_connections: int = 30, settings: Mapping[str, str] | None = None,
           base_dir: Path | None = None, with_openssl: bool = False) -> TempCluster:
    try:
        return start_cluster(major, max_connections=max_connections, settings=settings,
                             base_dir=base_dir, with_openssl=with_openssl)
    except ClusterError as exc:
        error = str(exc)
    pytest.fail(f"PostgreSQL {major} cluster did not start: {error}", pytrace=False)


@pytest.fixture(scope="module", params=MAJORS, ids=[f"pg{m}" for m in MAJORS])
def pg(request: pytest.FixtureRequest) -> Iterator[TempCluster]:
    """A started cluster (max_connections=30) shared by the tests of one module."""
    cluster = _start(request.param, max_connections=30)
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="module", params=PGBOUNCERS, ids=[f"pgbouncer{v}" for v in PGBOUNCERS])
def pgbouncer(request: pytest.FixtureRequest) -> Path:
    """The pgbouncer binary of each version under test, for ``start_pooler(binary=...)``."""
    try:
        return find_pgbouncer(request.param)
    except ClusterError as exc:
        error = str(exc)
    pytest.fail(f"PgBouncer {request.param} not found: {error}", pytrace=False)


MakeCluster = Callable[..., TempCluster]


@pytest.fixture
def make_cluster() -> Iterator[MakeCluster]:
    """Factory for extra clusters, cleaned up at teardown:
    ``make_cluster(pg.major, max_connections=8, settings={"reserved_connections": "2"})``."""
    clusters: list[TempCluster] = []

    def factory(major: int, *, max_connections: int = 30,
                settings: Mapping[str, str] | None = None,
                base_dir: Path | None = None) -> TempCluster:
        cluster = _start(major, max_connections=max_connections, settings=settings,
                         base_dir=base_dir)
        clusters.append(cluster)
        return cluster

    try:
        yield factory
    finally:
        for cluster in reversed(clusters):
            cluster.cleanup()


@pytest.fixture
async def admin(pg: TempCluster) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the module's cluster, for looking at pg_stat_activity.

    Its application is psql (excluded by the test policies); the least-privilege
    roles exist, and sessions an earlier test left behind are gone, before and after.
    """
    setup_roles(pg)
    kill_leftovers(pg)
    conn = await connect(pg, "postgres", "psql")
    try:
        yield conn
    finally:
        await conn.close()
        kill_leftovers(pg)
