"""While a PgBouncer cannot be read, the backends from its address are spared (fail closed).

Behind a stopped PgBouncer every backend still shows PgBouncer's address; the real client
that ``exclude.client_addrs`` names is unknown, so the exclusion cannot be judged. The real
PgBouncer is SIGSTOPped mid-run; the excluded client behind it survives, while a victim that
does not come from PgBouncer's address (a Unix-socket session) is killed in the same sweeps.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import asyncpg
import test_pgbouncer
import yaml
from daemon import Daemon, backend_alive
from helpers import free_port, sweeps_ran, wait_for
from pgwire import WireClient
from scenario import APP_ROLE, read_audit, run_cli
from sentry_endpoint import SentryEndpoint
from test_pgbouncer import REAL_CLIENT, MakePooler, backend_where, sample, write_policies

from watchdog.commands.demo.tempcluster import TempCluster

# The PgBouncer fixtures of test_pgbouncer (and whatever versions they are run over).
roles = test_pgbouncer.roles
make_pooler = test_pgbouncer.make_pooler


async def unix_session(pg: TempCluster) -> asyncpg.Connection:
    """A session of role app over PostgreSQL's Unix socket: client_addr NULL, not PgBouncer's."""
    return await asyncpg.connect(host=str(pg.datadir), port=pg.port, user=APP_ROLE,
                                 database="postgres", timeout=10,
                                 server_settings={"application_name": "leaky"})


async def test_a_stopped_pgbouncer_spares_the_excluded_client_behind_it(
    roles: TempCluster, make_pooler: MakePooler, tmp_path: Path
) -> None:
    pg = roles
    pooler = make_pooler(pool_mode="session")
    metrics = free_port()
    with SentryEndpoint() as sentry:
        path = write_policies(tmp_path, pg, pooler, interval="1s", extra={
            "alerts": {"sentry": {"dsn": sentry.dsn, "environment": "test"}},
            "metrics": {"listen": f"127.0.0.1:{metrics}"},
        })
        doc = yaml.safe_load(path.read_text())
        doc["exclude"]["client_addrs"] = [f"{REAL_CLIENT}/32"]  # the batch host, never killed
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        batch = await WireClient.connect(pooler.port, APP_ROLE, "postgres", source=REAL_CLIENT,
                                         application_name="batch")
        victim: asyncpg.Connection | None = None
        try:
            await batch.query("SELECT 1")
            batch_pid = await backend_where(pg, "the batch host's server", state="idle")
            with Daemon(path) as daemon:
                # The batch host's backend is past the idle policy: a candidate, so PgBouncer is
                # read, and the address PostgreSQL sees it from is learned.
                await wait_for(lambda: "pooler pgb1 reaches the server from 127.0.0.1"
                               in daemon.log(), 30, interval=0.1, what=f"a read {daemon.log()}")
                await sweeps_ran(pg, 2)
                assert await backend_alive(pg, batch_pid), daemon.log()
                pooler.pause()
                try:
                    await wait_for(lambda: sample(metrics, "pg_watchdog_pooler_up",
                                                  target="main", pooler="pgb1") == 0,
                                   30, interval=0.1, what=f"pooler_up 0 {daemon.log()}")
                    victim = await unix_session(pg)
                    victim_pid = int(victim.get_server_pid())

                    async def victim_gone() -> bool:
                        return not await backend_alive(pg, victim_pid)

                    await wait_for(victim_gone, 30, interval=0.1,
                                   what=f"the Unix-socket victim killed {daemon.log()}")
                    await sweeps_ran(pg, 3)
                    assert await backend_alive(pg, batch_pid), daemon.log()
                    status = await run_cli("status", "--explain", "--json", "-c", path)
                    [report] = status.json()["targets"]
                    row = next(r for r in report["explain"] if r["pid"] == batch_pid)
                    assert row["reason"] == "pooler pgb1 unreadable: real client unknown", row
                finally:
                    pooler.resume()
                assert daemon.stop() == 0
        finally:
            batch.close()
            if victim is not None:
                with contextlib.suppress(Exception):
                    await victim.close()
        troubles = [e for e in sentry.events() if e.get("tags", {}).get("kind") == "pooler"]
    assert [r["pid"] for r in read_audit(tmp_path / "audit.jsonl")] == [victim_pid]
    assert len(troubles) == 1, [e.get("message") for e in troubles]
    assert "backends from its address are spared" in troubles[0]["message"]
