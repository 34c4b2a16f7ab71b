"""Passwords (in DSNs, in password files) never reach any output: logs, audit, Sentry, CLI.

Every command runs for real, against a reachable server (each target logs in with a role
and password of its own over SCRAM: every secret is really used) and against unreachable
targets (a closed port, a host name that does not resolve, in URIs and key=value DSNs),
and every byte it writes (stdout, stderr, the service's log, the audit log, the Sentry
envelopes) is searched for each secret, as written and URL-decoded.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from scenario import BIN, WATCHDOG_ROLE, cli_env, idle_app_session, run_cli, setup_roles
from sentry_endpoint import SentryEndpoint

from watchdog.commands.demo.tempcluster import TempCluster, free_port

DSN_SECRET = "Hunter2-Secret"
FILE_SECRET = "Pw-File-Secret-42"
ENCODED_SECRET = "Enc%40Secret%2F99"  # the password Enc@Secret/99, URL-encoded in the DSN
QUERY_SECRET = "Query-Param-Secret"  # ?password=... (libpq and asyncpg accept it)
KEYWORD_SECRET = r"Kw Secret\'s"  # password='...' in a key=value DSN: the password Kw Secret's
SECRETS = (DSN_SECRET, FILE_SECRET, ENCODED_SECRET, "Enc@Secret/99", QUERY_SECRET,
           KEYWORD_SECRET, "Kw Secret's")
# The role (a member of watchdog) and password of each reachable target: a secret taken from
# the wrong place fails the login. The DSN's password of "main" loses to its password_file.
ROLES = {"main": ("wd_file", FILE_SECRET), "encoded": ("wd_encoded", "Enc@Secret/99"),
         "query-param": ("wd_query", QUERY_SECRET), "keywords": ("wd_keywords", "Kw Secret's")}


def assert_no_secret(what: str, text: str | bytes) -> None:
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    for secret in SECRETS:
        assert secret.encode() not in data, f"{what} shows the secret {secret!r}:\n{text!r}"


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    for role, password in ROLES.values():
        literal = password.replace("'", "''")
        pg.psql(f"CREATE ROLE {role} LOGIN IN ROLE {WATCHDOG_ROLE} PASSWORD '{literal}'")
    return pg


@pytest.fixture(scope="module")
def sentry() -> Iterator[SentryEndpoint]:
    with SentryEndpoint() as endpoint:
        yield endpoint


def write_config(path: Path, targets: list[dict[str, Any]], audit: Path,
                 sentry: SentryEndpoint) -> Path:
    doc = {
        "targets": targets,
        "exclude": {"superusers": True, "applications": ["psql"]},
        # Every target is the same server: whichever sweep (or leader, under `run`) comes
        # first acts; the others find the sessions gone.
        "policies": [{"name": "idle", "state": "idle", "longer_than": "300ms", "users": ["app"]}],
        "audit": {"path": str(audit)},
        "alerts": {"sentry": {"dsn": sentry.dsn, "environment": "test"}},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "pgpass-secret"
    path.write_text(FILE_SECRET + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture
def reachable(cluster: TempCluster, tmp_path: Path, password_file: Path,
              sentry: SentryEndpoint) -> Path:
    where = f"127.0.0.1:{cluster.port}/postgres"
    role = {name: role for name, (role, _) in ROLES.items()}
    return write_config(tmp_path / "reachable.yaml", [
        {"name": "main", "dsn": f"postgresql://{role['main']}:{DSN_SECRET}@{where}",
         "password_file": str(password_file), "interval": "500ms"},
        {"name": "encoded", "dsn": f"postgresql://{role['encoded']}:{ENCODED_SECRET}@{where}"},
        {"name": "query-param",
         "dsn": f"postgresql://{role['query-param']}@{where}?password={QUERY_SECRET}"},
        {"name": "keywords", "dsn": f"host=127.0.0.1 port={cluster.port} dbname=postgres"
                                    f" user={role['keywords']} password='{KEYWORD_SECRET}'"},
    ], tmp_path / "audit.jsonl", sentry)


@pytest.fixture
def unreachable(tmp_path: Path, password_file: Path, sentry: SentryEndpoint) -> Path:
    closed = free_port()
    return write_config(tmp_path / "unreachable.yaml", [
        {"name": "closed-port",
         "dsn": f"postgresql://{WATCHDOG_ROLE}:{DSN_SECRET}@127.0.0.1:{closed}/postgres",
         "password_file": str(password_file), "interval": "500ms"},
        {"name": "no-such-host",
         "dsn": f"postgresql://{WATCHDOG_ROLE}:{DSN_SECRET}@no-such-host.invalid:5432/postgres"},
        {"name": "keywords",
         "dsn": f"host=no-such-host.invalid user={WATCHDOG_ROLE} password='{KEYWORD_SECRET}'"},
    ], tmp_path / "audit-unreachable.jsonl", sentry)


@pytest.fixture
async def idle_app(cluster: TempCluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await idle_app_session(cluster, "leaky-app")
    try:
        yield conn
    finally:
        conn.terminate()


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


async def run_and_check(*args: str | Path, rc: int | tuple[int, ...]) -> str:
    res = await run_cli(*args, timeout=60)
    command = " ".join(map(str, args))
    assert res.rc in (rc if isinstance(rc, tuple) else (rc,)), (command, res.rc, res.stderr)
    assert "Traceback" not in res.stderr, (command, res.stderr)
    assert_no_secret(f"`{command}` stdout", res.stdout)
    assert_no_secret(f"`{command}` stderr", res.stderr)
    return res.stdout + res.stderr


async def run_service_briefly(config: Path, log: Path, until: Any) -> str:
    """`pg-watchdog -v run` until ``until()`` holds (at most 60 s), then SIGTERM; its output."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            str(BIN), "-v", "run", "-c", str(config),
            env=cli_env(), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
        )
    try:
        for _ in range(600):
            if until() or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a few more sweeps (and reconnect attempts)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    text = _read(log)
    assert code == 0, text
    assert "Traceback" not in text, text
    assert_no_secret("`run` log", text)
    return text


async def test_no_secret_in_any_output_of_a_reachable_target(
    cluster: TempCluster, reachable: Path, idle_app: asyncpg.Connection, tmp_path: Path,
    sentry: SentryEndpoint,
) -> None:
    await run_and_check("check", "-c", reachable, rc=0)
    out = await run_and_check("check", "--connect", "-c", reachable, rc=0)
    assert "reachable at" in out  # the secrets really went over the wire
    await asyncio.sleep(0.4)
    out = await run_and_check("once", "-c", reachable, rc=0)
    assert "terminated" in out
    await run_and_check("once", "--json", "-c", reachable, rc=0)
    for args in (["status"], ["status", "--json"], ["status", "--explain"],
                 ["status", "--json", "--explain"], ["audit"], ["audit", "--json"],
                 ["audit", "--summary"]):
        await run_and_check(*args, "-c", reachable, rc=0)

    # The service, with Sentry on: an idle session to act on, so events go out.
    sentry.clear()
    victim = await idle_app_session(cluster, "leaky-app-2")
    try:
        await run_service_briefly(reachable, tmp_path / "run.log",
                                  lambda: len(sentry.events()) >= 1)
    finally:
        victim.terminate()
    assert sentry.events(), "the service sent no Sentry event: nothing was checked"
    for body in sentry.bodies():
        assert_no_secret("a Sentry envelope", body)

    audit = tmp_path / "audit.jsonl"
    assert audit.stat().st_size > 0
    assert_no_secret("the audit log", audit.read_bytes())


async def test_no_secret_in_any_output_of_unreachable_targets(
    unreachable: Path, tmp_path: Path, sentry: SentryEndpoint,
) -> None:
    await run_and_check("check", "-c", unreachable, rc=0)
    out = await run_and_check("check", "--connect", "-c", unreachable, rc=1)
    for name in ("closed-port", "no-such-host", "keywords"):
        assert name in out
    for args in (["once"], ["once", "--json"], ["status"], ["status", "--json"],
                 ["status", "--explain"]):
        await run_and_check(*args, "-c", unreachable, rc=1)

    sentry.clear()
    await run_service_briefly(unreachable, tmp_path / "run.log",
                              lambda: len(sentry.events()) >= 3)
    assert sentry.events(), "no trouble alert reached Sentry: nothing was checked"
    for body in sentry.bodies():
        assert_no_secret("a Sentry envelope", body)
    audit = tmp_path / "audit-unreachable.jsonl"
    if audit.exists():
        assert_no_secret("the audit log", audit.read_bytes())


async def test_no_secret_when_the_password_file_is_unreadable(
    tmp_path: Path, cluster: TempCluster, sentry: SentryEndpoint,
) -> None:
    # Not UTF-8: the decoder's own message would quote the password's bytes.
    bad = tmp_path / "latin1-secret"
    bad.write_bytes(FILE_SECRET.encode() + b"\xff\xfe")
    config = write_config(tmp_path / "bad-file.yaml", [
        {"name": "main",
         "dsn": f"postgresql://{WATCHDOG_ROLE}:{DSN_SECRET}@127.0.0.1:{cluster.port}/postgres",
         "password_file": str(bad)},
    ], tmp_path / "audit.jsonl", sentry)
    out = await run_and_check("once", "-c", config, rc=1)
    assert "password_file" in out
    await run_and_check("check", "--connect", "-c", config, rc=1)
    await run_and_check("status", "-c", config, rc=1)
