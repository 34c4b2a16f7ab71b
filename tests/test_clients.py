"""Every client-pool recipe `advise` prints, proven with the real library against a real server.

Per library, a small app (tests/clients/) warms a pool of 5 connections; `pg-watchdog once`
terminates them once idle (kill.yaml: idle longer_than 1s), then the app serves 20 requests,
each a query through the pool. First without advice (the library's defaults plus the pool
size): what goes wrong is recorded, and those kills are the history `advise` reads (with the
seed thresholds, idle 10m, in policies.yaml). Then with the exact lines `advise` printed for
that library (its recipe, and how to set application_name): the process must stay alive and
all 20 requests succeed. The README's table must state exactly what was observed.

One PostgreSQL major is enough here (the newest selected): the libraries do not care.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from conftest import MAJORS
from helpers import connect, wait_for
from scenario import REPO, cli_env, policy_file, read_audit, run_cli, setup_roles

from watchdog.commands.advise.clients import CLIENTS, Client
from watchdog.commands.demo.tempcluster import ClusterError, TempCluster, start_cluster

MAJOR = max(MAJORS)
APPS = REPO / "tests" / "clients"
POOL = 5
REQUESTS = 20
NAMED = "my-app"  # the application_name the printed naming lines set
JARS = ("HikariCP", "postgresql", "slf4j-api", "slf4j-simple")
TIMINGS: dict[str, float] = {}


def _client(name: str) -> Client:
    return next(c for c in CLIENTS if c.name.startswith(name))


LIBRARIES = {
    "sqlalchemy": _client("SQLAlchemy"),
    "django": _client("Django"),
    "psycopg_pool": _client("psycopg_pool"),
    "asyncpg": _client("asyncpg"),
    "node-postgres": _client("node-postgres"),
    "hikaricp": _client("HikariCP"),
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[TempCluster]:
    try:
        c = start_cluster(MAJOR, max_connections=40)
    except ClusterError as exc:
        pytest.fail(f"PostgreSQL {MAJOR} cluster did not start: {exc}", pytrace=False)
    try:
        setup_roles(c)
        yield c
    finally:
        c.cleanup()


@pytest.fixture(scope="module")
def java_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HikariApp.java compiled once against Debian's HikariCP and PostgreSQL JDBC jars."""
    missing = [j for j in JARS if not Path(f"/usr/share/java/{j}.jar").exists()]
    assert not missing and shutil.which("javac"), (
        f"missing {missing or 'javac'}: run .ci/system-deps (libhikaricp-java,"
        " libpostgresql-jdbc-java, a JDK)")
    out = tmp_path_factory.mktemp("java")
    subprocess.run(["javac", "-d", str(out), "-cp", _classpath(), str(APPS / "HikariApp.java")],
                   check=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/clients/node_modules as package-lock.json pins it (npm ci when it is not)."""
    lock = json.loads((APPS / "package-lock.json").read_text())
    want = lock["packages"]["node_modules/pg"]["version"]
    have = APPS / "node_modules" / "pg" / "package.json"
    if not have.exists() or json.loads(have.read_text())["version"] != want:
        assert shutil.which("npm"), "npm is missing: run .ci/system-deps (nodejs, npm)"
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=APPS, check=True,
                       timeout=300, stdout=subprocess.DEVNULL)
    return APPS / "node_modules"


@pytest.fixture
async def admin(cluster: TempCluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(cluster, "postgres", "psql")
    try:
        yield conn
    finally:
        await conn.close()


def _classpath(classes: Path | None = None) -> str:
    jars = [f"/usr/share/java/{j}.jar" for j in JARS]
    return ":".join([str(classes)] * (classes is not None) + jars)


def _command(library: str, request: pytest.FixtureRequest) -> list[str]:
    if library == "node-postgres":
        request.getfixturevalue("node_modules")
        return ["node", str(APPS / "node_pg_app.js")]
    if library == "hikaricp":
        classes = request.getfixturevalue("java_classes")
        return ["java", "-cp", _classpath(classes), "HikariApp"]
    return [sys.executable, str(APPS / f"{library}_app.py")]


@dataclass(frozen=True)
class Outcome:
    """What one run of an app did after its pool's connections were terminated."""

    rc: int
    stdout: str
    stderr: str

    def done(self) -> tuple[int, int] | None:
        m = re.search(r"^done (\d+) (\d+)$", self.stdout, re.M)
        return (int(m.group(1)), int(m.group(2))) if m else None

    def observed(self) -> str:
        """The README's words for it: a crash, failed requests, or nothing."""
        done = self.done()
        if self.rc != 0 or done is None:
            return "the process crashes"
        if done[1]:
            return f"{done[1]} of {REQUESTS} requests {'fails' if done[1] == 1 else 'fail'}"
        return f"nothing: all {REQUESTS} requests succeed"

    def why(self) -> str:
        return f"rc={self.rc}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr[-3000:]}"


async def _terminate_idle(config: Path, audit: Path, admin: asyncpg.Connection,
                          pids: list[int]) -> None:
    """`pg-watchdog once` until every one of ``pids`` is gone, each by a real kill."""
    async def all_gone() -> bool:
        res = await run_cli("once", "-c", config)
        assert res.rc == 0, res.stderr
        left = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE pid = any($1::int[])",
                                 pids)
        return not left

    await wait_for(all_gone, 60, interval=0.2, what=f"pg-watchdog to terminate {pids}")
    killed = {r["pid"] for r in read_audit(audit) if r["outcome"] == "terminated"}
    assert set(pids) <= killed, (pids, killed)


async def _run_app(command: list[str], cluster: TempCluster, admin: asyncpg.Connection,
                   kill: Path, audit: Path, *, recipe: str, naming: str,
                   application_name: str) -> Outcome:
    env = cli_env() | {"CLIENT_DSN": cluster.dsn("app"), "CLIENT_POOL": str(POOL),
                       "CLIENT_RECIPE": recipe, "CLIENT_NAMING": naming}
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    errors = asyncio.create_task(proc.stderr.read())
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line.startswith("warm "):
            await proc.wait()
            raise AssertionError(f"the app did not warm its pool: {line!r}\n{await errors}")
        pids = [int(p) for p in line.split()[1:]]
        assert len(set(pids)) == POOL, line
        names = await admin.fetch("SELECT DISTINCT application_name FROM pg_stat_activity"
                                  " WHERE pid = any($1::int[])", pids)
        assert [r[0] for r in names] == [application_name], (names, application_name)
        await _terminate_idle(kill, audit, admin, pids)
        try:
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died of the kills already
        out = (await asyncio.wait_for(proc.stdout.read(), 90)).decode()
        rc = await asyncio.wait_for(proc.wait(), 30)
        return Outcome(rc, line + out, (await errors).decode(errors="replace"))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _printed_lines(finding: dict[str, object], client: Client) -> tuple[str, str]:
    """The recipe and the naming line `advise` printed for ``client`` (two lines in its fix)."""
    fix = finding["fix"]
    assert isinstance(fix, list)
    mine = [x[len(client.name) + 4:] for x in fix if x.startswith(f"  {client.name}: ")]
    naming = [x for x in mine if re.search(r"application_?name", x, re.I)]
    recipe = [x for x in mine if x not in naming]
    assert len(naming) == 1 and len(recipe) == 1, fix
    return recipe[0], naming[0]


def _naming_fragment(client: Client, naming: str) -> str:
    """What an app applies of the printed naming line: the URL query, or Django's assignment."""
    if naming.startswith("DATABASES"):
        return naming
    m = re.search(r"\?\S+$", naming)
    assert m, naming
    return m.group()


def readme_row(name: str) -> list[str]:
    """The cells of the README table row for library ``name`` (pipes in code unescaped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for line in text.splitlines():
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"README.md has no table row for {name!r}")


@pytest.mark.parametrize("library", list(LIBRARIES))
async def test_the_printed_recipe_survives_the_watchdogs_kills(
    library: str, cluster: TempCluster, admin: asyncpg.Connection, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    client = LIBRARIES[library]
    command = _command(library, request)
    started = time.monotonic()
    audit = tmp_path / "audit.jsonl"
    kill = policy_file(tmp_path, cluster, audit_path=audit, idle="1s",
                       idle_in_transaction="1h", name="kill.yaml")
    seed = policy_file(tmp_path, cluster, audit_path=audit, idle="10m",
                       idle_in_transaction="5m")

    plain = await _run_app(command, cluster, admin, kill, audit, recipe="", naming="",
                           application_name=client.default_application_name)

    doc = json.loads((await run_cli("advise", "-c", seed, "--json")).stdout)
    [leak] = [f for f in doc["findings"] if f["id"] == "leak"]
    if client.default_application_name:
        assert leak["subject"] == f"application '{client.default_application_name}' (role app)"
        assert not any(x.startswith(f"  {c.name}: ") for c in CLIENTS if c != client
                       for x in leak["fix"]), "a recognised library gets its own recipe only"
    else:
        assert leak["subject"] == "sessions without an application_name (role app)", leak
        assert any(f"{POOL} kills of sessions that sent no application_name" in e
                   for e in leak["evidence"]), leak
    recipe, naming = _printed_lines(leak, client)

    advised = await _run_app(command, cluster, admin, kill, audit, recipe=recipe,
                             naming=_naming_fragment(client, naming), application_name=NAMED)
    TIMINGS[library] = time.monotonic() - started
    print(f"{library}: without advice {plain.observed()}; with `{recipe}` "
          f"{advised.observed()}; {TIMINGS[library]:.1f}s")

    assert advised.rc == 0 and advised.done() == (REQUESTS, 0), advised.why()
    row = readme_row(client.name)
    assert len(row) == 4, row
    assert row[1].startswith(plain.observed()), (row[1], plain.observed(), plain.why())
    assert row[2] == f"`{recipe}`", (row[2], recipe)
    assert row[3] == "yes", row
