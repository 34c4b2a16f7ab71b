"""pg-watchdog in front of a real PgBouncer (Debian's 1.18, and 1.24 built from Debian 13's
source: fixture ``pgbouncer``) in front of real PostgreSQL.

The suite starts its own PgBouncers (temppooler) with a generated ini: trust auth
on loopback, the watchdog role in stats_users. Clients are tests/pgwire.WireClient, so each
one's socket address is known (and can be 127.0.0.3 while PgBouncer reaches PostgreSQL from
127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sentry_sdk
import yaml
from daemon import Daemon
from helpers import connect, free_port, wait_for
from pgwire import WireClient
from prometheus_client.parser import text_string_to_metric_families
from scenario import APP_ROLE, kill_leftovers, policy_file, read_audit, setup_roles
from sentry_endpoint import SentryEndpoint
from temppooler import TempPooler, start_pooler

from watchdog.alerts.hub import Alerts
from watchdog.audit.log import AuditLog
from watchdog.commands.demo.tempcluster import ClusterError, TempCluster
from watchdog.config.policy import Config, load_config
from watchdog.core.decide import decide
from watchdog.core.model import ClientUnknown, Verdict
from watchdog.pg.connect import connect as connect_target
from watchdog.pg.connect import server_address
from watchdog.pgbouncer.watch import PoolerWatch
from watchdog.service.sweep import SweepReport, look, sweep_target

REAL_CLIENT = "127.0.0.3"  # a loopback address PgBouncer itself never uses towards PostgreSQL
UNREADABLE = ClientUnknown.UNREADABLE

MakePooler = Callable[..., TempPooler]


@pytest.fixture
def roles(pg: TempCluster) -> Iterator[TempCluster]:
    setup_roles(pg)
    kill_leftovers(pg)
    yield pg
    kill_leftovers(pg)


@pytest.fixture
def make_pooler(roles: TempCluster, pgbouncer: Path) -> Iterator[MakePooler]:
    """``make_pooler(pool_mode="session", settings={...})``: a PgBouncer before ``pg``."""
    made: list[TempPooler] = []

    def factory(**kw: Any) -> TempPooler:
        try:
            pooler = start_pooler(roles, binary=pgbouncer, **kw)
        except ClusterError as exc:
            pytest.fail(f"PgBouncer did not start: {exc}", pytrace=False)
        made.append(pooler)
        return pooler

    try:
        yield factory
    finally:
        for pooler in made:
            pooler.cleanup()


def write_policies(tmp_path: Path, pg: TempCluster, pooler: TempPooler, *,
                   idle: str = "1s", idle_in_transaction: str = "1s",
                   extra: dict[str, Any] | None = None, interval: str = "30s") -> Path:
    path = policy_file(tmp_path, pg, idle=idle, idle_in_transaction=idle_in_transaction,
                       interval=interval, extra=extra)
    doc = yaml.safe_load(path.read_text())
    doc["targets"][0]["poolers"] = [{"name": "pgb1", "dsn": pooler.dsn()}]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Watch:
    """The watchdog's side, in process: the target's connection, its pooler reader, sweeps."""

    def __init__(self, config: Config, conn: Any, server: str) -> None:
        self.config, self.conn, self.server = config, conn, server
        self.target = config.target("main")
        self.poolers = PoolerWatch(self.target)
        self.audit = AuditLog(config.audit.path)
        self.sweeps = 0

    async def sweep(self) -> SweepReport:
        self.sweeps += 1
        return await sweep_target(self.conn, self.server, self.config, self.target, self.audit,
                                  poolers=self.poolers)

    async def verdicts(self) -> dict[int, Verdict]:
        snapshot, _ = await look(self.conn, self.server, self.poolers)
        return {v.session.pid: v for v in decide(snapshot, self.config, "main").verdicts}


@contextlib.asynccontextmanager
async def watching(path: Path) -> AsyncIterator[Watch]:
    config = load_config(str(path))
    conn = await connect_target(config.target("main"))
    watch = Watch(config, conn, await server_address(conn))
    try:
        yield watch
    finally:
        await watch.poolers.close()
        await conn.close()


async def app_backends(pg: TempCluster) -> dict[int, dict[str, Any]]:
    """pid -> pg_stat_activity row of role app's backends (PgBouncer's server connections)."""
    conn = await connect(pg)
    try:
        rows = await conn.fetch(
            "SELECT pid, state, query, client_addr, client_port FROM pg_stat_activity"
            " WHERE usename = $1 AND backend_type = 'client backend'", APP_ROLE)
    finally:
        await conn.close()
    return {r["pid"]: dict(r) for r in rows}


async def backend_where(pg: TempCluster, what: str, **match: str) -> int:
    """The pid of the one app backend whose columns equal ``match`` (polls until it shows)."""
    found: list[int] = []

    async def shows() -> bool:
        found[:] = [p for p, r in (await app_backends(pg)).items()
                    if all(r[k] == v for k, v in match.items())]
        return len(found) == 1

    await wait_for(shows, 15, what=what)
    return found[0]


async def past(seconds: float) -> None:
    """Let thresholds of ``seconds`` pass (thresholds are the point of these tests)."""
    await asyncio.sleep(seconds)


def record_of(path: Path, pid: int) -> dict[str, Any]:
    [rec] = [r for r in read_audit(path) if r["pid"] == pid]
    return rec


# -- attribution and sparing ------------------------------------------------------------------


async def test_transaction_pooling_kills_idle_in_transaction_and_spares_the_pool(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    pg = roles
    pooler = make_pooler(pool_mode="transaction")
    path = write_policies(tmp_path, pg, pooler)
    iit = await WireClient.connect(pooler.port, APP_ROLE, "postgres", application_name="iit")
    sleeper = await WireClient.connect(pooler.port, APP_ROLE, "postgres", application_name="zz")
    idle = await WireClient.connect(pooler.port, APP_ROLE, "postgres", application_name="idle")
    try:
        await iit.query("BEGIN; SELECT 1")
        iit_pid = await backend_where(pg, "the open transaction", state="idle in transaction")
        # pg_sleep before the idle client's query: otherwise it would reuse that server.
        sleeper.send("SELECT pg_sleep(60)")
        sleep_pid = await backend_where(pg, "pg_sleep", query="SELECT pg_sleep(60)")
        await idle.query("SELECT 1")
        pooled_pid = await backend_where(pg, "the pooled server", state="idle")
        async with watching(path) as watch:
            verdicts = await watch.verdicts()
            assert verdicts[pooled_pid].reason == "pooled by pgb1 (no client)"

            async def iit_gone() -> bool:
                await watch.sweep()
                return iit_pid not in await app_backends(pg)

            await wait_for(iit_gone, 20, interval=0.2, what="the idle-in-transaction kill")
            await past(1.5)  # the pooled server is now idle past the 1s policy
            for _ in range(3):
                report = await watch.sweep()
                assert report.poolers.errors == {}
            verdicts = await watch.verdicts()
            assert verdicts[pooled_pid].reason == "pooled by pgb1 (no client)"
            assert verdicts[sleep_pid].reason == "no policy for state 'active'"
            backends = await app_backends(pg)
            assert pooled_pid in backends and sleep_pid in backends
        assert await idle.alive(), "the idle client lost its connection"
        rec = record_of(tmp_path / "audit.jsonl", iit_pid)
        assert rec["outcome"] == "terminated" and rec["policy"] == "idle-in-transaction"
        assert rec["pooler"] == "pgb1"
        client = rec["pooler_client"]
        assert (client["addr"], client["port"]) == (iit.addr, iit.port)
        assert client["user"] == APP_ROLE and client["database"] == "postgres"
        assert client["application_name"] == "iit"
        assert client["connect_time"].endswith("Z")
        assert rec["client_addr"] == "127.0.0.1"  # the backend's own: PgBouncer's address
        assert [r["pid"] for r in read_audit(tmp_path / "audit.jsonl")] == [iit_pid]
    finally:
        for c in (iit, sleeper, idle):
            c.close()


async def test_session_pooling_kills_an_idle_clients_server_with_attribution(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    pg = roles
    pooler = make_pooler(pool_mode="session")
    path = write_policies(tmp_path, pg, pooler)
    client = await WireClient.connect(pooler.port, APP_ROLE, "postgres", source=REAL_CLIENT,
                                      application_name="session-app")
    try:
        await client.query("SELECT 1")
        pid = await backend_where(pg, "the session's server", state="idle")
        async with watching(path) as watch:
            assert "pooled" not in (await watch.verdicts())[pid].reason

            async def gone() -> bool:
                await watch.sweep()
                return pid not in await app_backends(pg)

            await wait_for(gone, 20, interval=0.2, what="the idle session's kill")
        rec = record_of(tmp_path / "audit.jsonl", pid)
        assert rec["policy"] == "idle" and rec["outcome"] == "terminated"
        assert rec["pooler"] == "pgb1"
        assert rec["pooler_client"]["addr"] == REAL_CLIENT == client.addr
        assert rec["pooler_client"]["port"] == client.port
        assert rec["pooler_client"]["application_name"] == "session-app"
    finally:
        client.close()


async def test_excluded_real_client_address_is_spared_behind_pgbouncer(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    pg = roles
    pooler = make_pooler(pool_mode="session")
    path = write_policies(tmp_path, pg, pooler)
    doc = yaml.safe_load(path.read_text())
    doc["exclude"]["client_addrs"] = [f"{REAL_CLIENT}/32"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    batch = await WireClient.connect(pooler.port, APP_ROLE, "postgres", source=REAL_CLIENT,
                                     application_name="batch")
    other = await WireClient.connect(pooler.port, APP_ROLE, "postgres",
                                     application_name="other")
    try:
        await batch.query("SELECT 1")
        batch_pid = await backend_where(pg, "the batch host's server", state="idle")
        await other.query("SELECT 2")
        other_pid = await backend_where(pg, "the other server", query="SELECT 2")
        async with watching(path) as watch:

            async def other_gone() -> bool:
                await watch.sweep()
                return other_pid not in await app_backends(pg)

            # The same policy kills the other client's server: the sweeps act.
            await wait_for(other_gone, 20, interval=0.2, what="the other idle session's kill")
            await watch.sweep()
            verdict = (await watch.verdicts())[batch_pid]
            assert verdict.reason == f"excluded client address {REAL_CLIENT}"
        assert batch_pid in await app_backends(pg)
        assert await batch.alive()
        assert [r["pid"] for r in read_audit(tmp_path / "audit.jsonl")] == [other_pid]
    finally:
        batch.close()
        other.close()


async def test_hung_pooler_fails_its_read_not_the_sweep(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    pg = roles
    pooler = make_pooler(pool_mode="session")
    # Dry run: the idle session is past its threshold (so the pooler is read) but stays.
    path = write_policies(tmp_path, pg, pooler, idle="1s", extra={"dry_run": True})
    client = await WireClient.connect(pooler.port, APP_ROLE, "postgres", source=REAL_CLIENT)
    try:
        await client.query("SELECT 1")
        pid = await backend_where(pg, "the session's server", state="idle")
        await past(1.5)
        async with watching(path) as watch:
            assert (await watch.sweep()).snapshot.pooled[pid].pooler == "pgb1"
            pooler.pause()  # SIGSTOP: its sockets stay open, nothing answers
            try:
                await past(1.1)  # the last answer is not reused past a second
                report = await watch.sweep()
                assert report.poolers.errors == {"pgb1": "main: pooler pgb1: timed out"}
                # While it hangs, its backends are spared: their real client is unknown.
                link = report.snapshot.pooled[pid]
                assert (link.pooler, link.client, link.unknown) == ("pgb1", None, UNREADABLE)
                report = await watch.sweep()  # backing off: no new wait
                assert report.poolers.errors["pgb1"].endswith("(retrying)")
                assert not watch.conn.is_closed()
            finally:
                pooler.resume()

            async def back() -> bool:
                link = (await watch.sweep()).snapshot.pooled.get(pid)
                return link is not None and link.unknown is None

            await wait_for(back, 60, interval=0.2, what="attribution after the pooler resumed")
    finally:
        client.close()


# -- the running service: queueing alerts, metrics, a pooler that goes away ------------------


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(port: int, name: str, **labels: str) -> float | None:
    with contextlib.suppress(OSError):
        return scrape(port).get((name, frozenset(labels.items())))
    return None


def service_config(tmp_path: Path, pg: TempCluster, pooler: TempPooler, sentry: SentryEndpoint,
                   metrics_port: int, *, idle: str = "1h", wait: str = "1s") -> Path:
    return write_policies(
        tmp_path, pg, pooler, idle=idle, idle_in_transaction="1h", interval="1s",
        extra={
            "alerts": {"sentry": {"dsn": sentry.dsn, "environment": "test"},
                       "pooler_wait_above": wait},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        },
    )


def events(sentry: SentryEndpoint, kind: str) -> list[dict[str, Any]]:
    return [e for e in sentry.events() if e.get("fingerprint", [None, None])[1] == kind]


async def test_queued_clients_raise_one_error_event_and_the_waiting_gauge(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    pg = roles
    pooler = make_pooler(pool_mode="transaction", settings={"default_pool_size": "1"})
    port = free_port()
    holder = await WireClient.connect(pooler.port, APP_ROLE, "postgres", application_name="hold")
    queued = await WireClient.connect(pooler.port, APP_ROLE, "postgres", application_name="q")
    with SentryEndpoint() as sentry:
        path = service_config(tmp_path, pg, pooler, sentry, port)
        with Daemon(path) as daemon:
            try:
                await holder.query("BEGIN; SELECT 1")
                queued.send("SELECT 1")  # no server left in the pool: it waits
                labels = {"target": "main", "pooler": "pgb1", "database": "postgres",
                          "user": APP_ROLE}

                def waiting() -> bool:
                    return sample(port, "pg_watchdog_pooler_clients_waiting", **labels) == 1

                await wait_for(waiting, 30, interval=0.2, what=f"the gauge ({daemon.log()})")
                await wait_for(lambda: events(sentry, "pooler-wait"), 30, interval=0.2,
                               what=f"the pooler-wait event ({daemon.log()})")
                swept = sample(port, "pg_watchdog_sweeps_total", target="main") or 0.0
                await wait_for(
                    lambda: (sample(port, "pg_watchdog_sweeps_total", target="main") or 0)
                    >= swept + 3, 30, interval=0.2, what="three more sweeps")
                assert sample(port, "pg_watchdog_pooler_clients_waiting", **labels) == 1
                wait_s = sample(port, "pg_watchdog_pooler_maxwait_seconds", **labels)
                assert wait_s is not None and wait_s > 1
                assert sample(port, "pg_watchdog_pooler_up", target="main", pooler="pgb1") == 1
                assert sample(port, "pg_watchdog_pooler_max_client_conn", target="main",
                              pooler="pgb1") == 200
            finally:
                holder.close()
                queued.close()
            assert daemon.stop() == 0
        [event] = events(sentry, "pooler-wait")
    assert event["level"] == "error"
    assert event["fingerprint"] == ["pg-watchdog", "pooler-wait", "main", "pgb1"]
    assert event["tags"] == {"target": "main", "pooler": "pgb1"}
    assert event["message"].startswith("main: 1 client queued in pooler pgb1, the oldest for")
    [pool] = event["contexts"]["pg_watchdog"]["pools"]
    assert pool["cl_waiting"] == 1 and pool["database"] == "postgres"


async def test_stopped_pooler_alerts_once_and_attribution_returns(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    pg = roles
    pooler = make_pooler(pool_mode="session")
    port = free_port()
    audit = tmp_path / "audit.jsonl"
    with SentryEndpoint() as sentry:
        path = service_config(tmp_path, pg, pooler, sentry, port, idle="1s")
        with Daemon(path) as daemon:

            def sweeps() -> float:
                return sample(port, "pg_watchdog_sweeps_total", target="main") or 0.0

            def up() -> float | None:
                return sample(port, "pg_watchdog_pooler_up", target="main", pooler="pgb1")

            await wait_for(lambda: up() == 1, 30, interval=0.2, what=f"pooler up {daemon.log()}")
            pooler.stop()
            await wait_for(lambda: up() == 0, 30, interval=0.2, what="pooler_up 0")
            during = sweeps()
            await wait_for(lambda: sweeps() >= during + 4, 30, interval=0.2,
                           what="sweeps going on without the pooler")
            assert len(events(sentry, "pooler")) == 1
            pooler.start()
            await wait_for(lambda: up() == 1, 60, interval=0.2, what="pooler_up 1 again")
            client = await WireClient.connect(pooler.port, APP_ROLE, "postgres",
                                              source=REAL_CLIENT, application_name="back")
            try:
                await client.query("SELECT 1")
                await wait_for(lambda: any(r.get("pooler") == "pgb1" for r in read_audit(audit)),
                               30, interval=0.2, what=f"an attributed kill ({daemon.log()})")
            finally:
                client.close()
            assert daemon.stop() == 0
        [trouble] = events(sentry, "pooler")
    assert trouble["level"] == "error"
    assert trouble["tags"] == {"kind": "pooler", "target": "main"}
    assert "pooler pgb1" in trouble["message"]
    [rec] = [r for r in read_audit(audit) if r.get("pooler") == "pgb1"]
    assert rec["pooler_client"]["addr"] == REAL_CLIENT
    assert rec["pooler_client"]["port"] == client.port
    [acted] = events(sentry, "acted")
    assert acted["contexts"]["pg_watchdog"]["top_clients"] == {REAL_CLIENT: 1}


async def test_clients_near_max_client_conn_raise_one_error_event_per_crossing(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    pg = roles
    pooler = make_pooler(settings={"max_client_conn": "10"})
    clients: list[WireClient] = []
    with SentryEndpoint() as sentry:
        # The pools' figures are read once per interval: 1 s here.
        path = write_policies(tmp_path, pg, pooler, interval="1s", extra={
            "alerts": {"sentry": {"dsn": sentry.dsn, "environment": "test"},
                       "connections_above": "75%"}})
        alerts = Alerts(load_config(str(path)))
        try:
            async with watching(path) as watch:

                def crossings() -> list[dict[str, Any]]:
                    sentry_sdk.flush(timeout=5)
                    return events(sentry, "pooler-clients")

                async def clients_seen(n: int) -> None:
                    async def seen() -> bool:
                        report = await watch.sweep()
                        alerts.swept(report)
                        return report.poolers.looks[0].clients_used == n

                    await wait_for(seen, 20, interval=0.1, what=f"{n} clients counted")

                for _ in range(6):  # 7 of 10 with the watchdog's own console connection
                    clients.append(await WireClient.connect(pooler.port, APP_ROLE, "postgres"))
                await clients_seen(7)
                assert crossings() == []
                clients.append(await WireClient.connect(pooler.port, APP_ROLE, "postgres"))
                await clients_seen(8)
                alerts.swept(await watch.sweep())  # still above: nothing new
                [event] = crossings()
                for c in clients[:3]:
                    c.close()
                await clients_seen(5)
                for _ in range(3):
                    clients.append(await WireClient.connect(pooler.port, APP_ROLE, "postgres"))
                await clients_seen(8)  # crosses again: re-armed
                assert len(crossings()) == 2
        finally:
            for c in clients:
                c.close()
            alerts.close()
            sentry_sdk.get_client().close()
            sentry_sdk.get_global_scope().set_client(None)
    assert event["level"] == "error"
    assert event["message"] == "main: pooler pgb1 at 80% of max_client_conn (8/10 clients)"
    assert event["tags"] == {"target": "main", "pooler": "pgb1"}


# -- the tools around it ------------------------------------------------------------------------


async def test_check_connect_names_the_pooler_it_cannot_read(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    from scenario import run_cli

    pg = roles
    pooler = make_pooler()
    path = write_policies(tmp_path, pg, pooler)
    doc = yaml.safe_load(path.read_text())
    doc["targets"][0]["poolers"].append(
        {"name": "pgb2", "dsn": f"postgresql://watchdog@127.0.0.1:{free_port()}/pgbouncer"})
    doc["targets"][0]["poolers"].append(
        {"name": "pgb3", "dsn": pooler.dsn(user=APP_ROLE)})  # neither admin nor stats user
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = await run_cli("check", "--connect", "-c", path)
    assert result.rc == 1, result
    lines = result.stdout.splitlines()
    assert any(line.strip().startswith("ok    pooler pgb1: can run SHOW POOLS") for line in lines)
    assert any("FAIL  pooler pgb2: cannot connect" in line for line in lines), lines
    assert any("FAIL  pooler pgb3:" in line for line in lines), lines


async def test_status_explain_shows_the_real_client_and_the_pools(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    from scenario import run_cli

    pg = roles
    pooler = make_pooler(pool_mode="transaction")
    path = write_policies(tmp_path, pg, pooler, idle="1h", idle_in_transaction="1h")
    iit = await WireClient.connect(pooler.port, APP_ROLE, "postgres", source=REAL_CLIENT)
    idle = await WireClient.connect(pooler.port, APP_ROLE, "postgres")
    try:
        await iit.query("BEGIN; SELECT 1")
        iit_pid = await backend_where(pg, "the transaction", state="idle in transaction")
        await idle.query("SELECT 1")
        idle_pid = await backend_where(pg, "the pooled server", state="idle")
        result = await run_cli("status", "--explain", "--json", "-c", path)
        assert result.rc == 0, result
        [report] = result.json()["targets"]
        rows = {r["pid"]: r for r in report["explain"]}
        assert rows[iit_pid]["client"] == f"{REAL_CLIENT}:{iit.port} via pgb1"
        assert rows[idle_pid]["client"] == "pooled by pgb1 (no client)"
        assert rows[idle_pid]["reason"] == "pooled by pgb1 (no client)"
        [pools] = report["pools"]
        assert pools["pooler"] == "pgb1" and pools["max_client_conn"] == 200
        app_pool = next(p for p in pools["pools"] if p["database"] == "postgres")
        assert app_pool["sv_active"] == 1 and app_pool["sv_idle"] == 1
        text = await run_cli("status", "--explain", "-c", path)
        assert f"{REAL_CLIENT}:{iit.port} via pgb1" in text.stdout
        assert "pools        pgb1: 3 clients of max_client_conn 200" in text.stdout, text.stdout
        assert "clients 2 active, 0 waiting" in text.stdout, text.stdout
        once = await run_cli("once", "--dry-run", "-c", path)
        assert once.rc == 0, once
    finally:
        iit.close()
        idle.close()


async def test_the_pooler_is_the_version_under_test(
    request: pytest.FixtureRequest, make_pooler: MakePooler
) -> None:
    import psycopg

    pooler = make_pooler()
    conn = await psycopg.AsyncConnection.connect(
        pooler.dsn(), autocommit=True, cursor_factory=psycopg.AsyncClientCursor
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute("SHOW VERSION")
            row = await cur.fetchone()
    finally:
        await conn.close()
    assert row[0].startswith(f"PgBouncer {request.node.callspec.params['pgbouncer']}."), row


async def test_pooler_connection_takes_no_server_settings(
    roles: TempCluster, make_pooler: MakePooler
) -> None:
    """PgBouncer refuses unknown startup parameters: the watchdog's own settings would fail."""
    pooler = make_pooler()
    with pytest.raises(asyncpg.PostgresError, match="unsupported startup parameter"):
        await asyncpg.connect(pooler.dsn(), server_settings={"idle_session_timeout": "0"})
