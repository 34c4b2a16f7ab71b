"""Each leak traced to the statement that left it open, from real kills.

Application billing-worker leaks from two code paths: one looks an invoice up FOR UPDATE
and never commits (idle in transaction), the other marks it sent and never returns the
connection (idle). Each session runs its statement with its own constants. `pg-watchdog once`
kills them in three batches written with audit.query full, truncate and omit; `advise` must
name both shapes (constants as $n) with the right counts and states, count the kill without
a statement, and `audit --summary` must count them by statement.
"""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
from helpers import connect, wait_for
from scenario import policy_file, read_audit, run_cli, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster

APP = "billing-worker"
RESERVE = "SELECT id, total FROM invoices WHERE id = ID FOR UPDATE"
MARK_SENT = "UPDATE invoices SET status = 'sent' WHERE id = ID"
RESERVE_SHAPE = "SELECT id, total FROM invoices WHERE id = $1 FOR UPDATE"
MARK_SENT_SHAPE = "UPDATE invoices SET status = $1 WHERE id = $2"
# audit.query of each batch -> (sessions of the reserve path, of the mark-sent path)
BATCHES = {"full": (4, 2), "truncate": (3, 2), "omit": (1, 0)}


def _schema(pg: TempCluster) -> None:
    pg.psql("""
        DROP TABLE IF EXISTS invoices;
        CREATE TABLE invoices (id int PRIMARY KEY, total numeric NOT NULL DEFAULT 0,
                               status text NOT NULL DEFAULT 'new');
        INSERT INTO invoices (id) SELECT generate_series(1, 100);
        GRANT SELECT, UPDATE ON invoices TO app;
    """)


async def _leak(pg: TempCluster, first_id: int, reserve: int, mark_sent: int
                ) -> list[asyncpg.Connection]:
    """Sessions left behind by the two code paths, each with its own invoice id."""
    conns = []
    for i in range(reserve + mark_sent):
        conn = await connect(pg, "app", APP)
        invoice = str(first_id + i)
        if i < reserve:
            await conn.execute("BEGIN")
            await conn.execute(RESERVE.replace("ID", invoice))
        else:
            await conn.execute(MARK_SENT.replace("ID", invoice))
        conns.append(conn)
    return conns


async def _kill_batch(config: Path, audit: Path, conns: list[asyncpg.Connection]) -> None:
    pids = {c.get_server_pid() for c in conns}

    async def all_killed() -> bool:
        res = await run_cli("once", "-c", config)
        assert res.rc == 0, res.stderr
        return pids <= {r["pid"] for r in read_audit(audit) if r["outcome"] == "terminated"}

    await wait_for(all_killed, 60, interval=0.2, what=f"{len(pids)} sessions terminated")
    for conn in conns:
        conn.terminate()


async def test_advise_names_both_leaking_statements_with_their_counts(
    pg: TempCluster, tmp_path: Path
) -> None:
    setup_roles(pg)
    _schema(pg)
    audit = tmp_path / "audit.jsonl"
    first_id = 1
    config = tmp_path / "policies.yaml"
    for mode, (reserve, mark_sent) in BATCHES.items():
        config = policy_file(tmp_path, pg, audit_path=audit, idle="500ms",
                             idle_in_transaction="500ms", name=f"{mode}.yaml")
        doc = config.read_text().replace("query: truncate", f"query: {mode}")
        config.write_text(doc)
        conns = await _leak(pg, first_id, reserve, mark_sent)
        first_id += reserve + mark_sent
        await _kill_batch(config, audit, conns)

    records = read_audit(audit)
    assert len(records) == 12 and {r["outcome"] for r in records} == {"terminated"}
    assert any(r["query"] and "WHERE id = 1 FOR UPDATE" in r["query"] for r in records), \
        "the full batch must hold the constants: advise redacts them itself"

    res = await run_cli("advise", "-c", config, "--json")
    assert res.rc == 0, res.stderr
    [leak] = [f for f in res.json()["findings"] if f["id"] == "leak"]
    assert leak["subject"] == f"application '{APP}' (role app)", leak
    evidence = leak["evidence"]
    assert (f"7 of 12 kills of {APP} were idle in transaction after `{RESERVE_SHAPE}`"
            in evidence), evidence
    assert f"4 of 12 kills of {APP} were idle after `{MARK_SENT_SHAPE}`" in evidence, evidence
    assert "1 of 12 kills have no statement in the audit log (audit.query: omit)" in evidence
    assert leak["fix"][0].startswith(f"Look first at the code that runs `{RESERVE_SHAPE}`: 7 of"
                                     " 12 kills came after it"), leak["fix"]
    assert "'sent'" not in json.dumps(leak), "constants never reach the advice"

    text = await run_cli("advise", "-c", config)
    assert f"were idle after `{MARK_SENT_SHAPE}`" in text.stdout, text.stdout

    summary = await run_cli("audit", "--file", audit, "--summary", "--json")
    assert summary.rc == 0, summary.stderr
    assert summary.json()["by_statement"] == {RESERVE_SHAPE: 7, MARK_SENT_SHAPE: 4, "": 1}
    table = await run_cli("audit", "--file", audit, "--summary")
    section = table.stdout[table.stdout.index("by statement"):]
    assert f"7  {RESERVE_SHAPE}" in section and f"4  {MARK_SENT_SHAPE}" in section, section
