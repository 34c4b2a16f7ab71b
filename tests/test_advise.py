"""`pg-watchdog advise` on real servers: the leak named, the server timeout to set, and quiet.

Role `leaky` (application `leaky-app`) is killed for idle in transaction 20 times, for real,
by `pg-watchdog once` (threshold 500ms); roles `good` and `batch` work beside it and are never
killed. The advice names leaky-app, gives the ALTER ROLE statement for leaky and names neither
good nor batch; once the statement is applied, that finding is gone.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from helpers import connect, free_port, wait_for
from scenario import is_alive, policy_file, read_audit, run_cli, setup_roles

from watchdog.commands.demo.tempcluster import TempCluster

IIT_FINDING = "idle_in_transaction_timeout"
FIELDS = ("id", "severity", "target", "subject", "evidence", "fix")


def _roles(pg: TempCluster) -> None:
    pg.psql(
        "SELECT format('CREATE ROLE %I LOGIN', r) FROM unnest(ARRAY['leaky', 'good', 'batch']) r"
        " WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) \\gexec"
    )
    pg.psql("ALTER ROLE leaky RESET ALL")


async def _advise(config: Path, *extra: str, rc: int = 0) -> dict[str, Any]:
    res = await run_cli("advise", "-c", config, "--json", *extra)
    assert res.rc == rc, (res.rc, res.stdout, res.stderr)
    doc = json.loads(res.stdout)
    for f in doc["findings"]:
        assert set(FIELDS) <= set(f), f
        assert f["evidence"] and f["fix"], f
    return doc


def _by_id(doc: dict[str, Any], fid: str) -> list[dict[str, Any]]:
    return [f for f in doc["findings"] if f["id"] == fid]


def _names_role(finding: dict[str, Any], role: str) -> bool:
    return re.search(rf"\b{role}\b", json.dumps(finding)) is not None


async def _leak_twenty(pg: TempCluster, config: Path, audit: Path) -> list[asyncpg.Connection]:
    """20 leaky sessions left idle in transaction, each ended by a real `once` sweep; the
    good and batch sessions it must leave alone are returned, still open."""
    good = [await connect(pg, "good", "good-app") for _ in range(2)]
    for conn in good:
        await conn.execute("SELECT 1")
    batch = await connect(pg, "batch", "batch-report")
    running = asyncio.create_task(batch.execute("SELECT pg_sleep(60)"))
    leaky = [await connect(pg, "leaky", "leaky-app") for _ in range(20)]
    for conn in leaky:
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")

    async def all_killed() -> bool:
        res = await run_cli("once", "-c", config)
        assert res.rc == 0, res.stderr
        return sum(r["outcome"] == "terminated" for r in read_audit(audit)) >= 20

    await wait_for(all_killed, 60, interval=0.3, what="20 leaky sessions terminated")
    for conn in leaky:
        conn.terminate()
    records = read_audit(audit)
    assert len(records) == 20 and {r["usename"] for r in records} == {"leaky"}, records
    for conn in good:
        assert await is_alive(conn)
    assert not running.done()
    running.cancel()
    return [*good, batch]


async def test_leak_and_timeout_advice_then_the_fix_removes_it(
    pg: TempCluster, tmp_path: Path
) -> None:
    setup_roles(pg)
    _roles(pg)
    audit = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path, pg, idle="1h", idle_in_transaction="500ms")
    kept = await _leak_twenty(pg, config, audit)
    try:
        doc = await _advise(config)
        [leak] = _by_id(doc, "leak")
        assert "leaky-app" in leak["subject"] and "leaky" in leak["subject"], leak
        assert any("20 kills" in e for e in leak["evidence"]), leak
        [iit] = _by_id(doc, IIT_FINDING)
        [statement] = [x for x in iit["fix"] if x.startswith("ALTER ROLE leaky SET")]
        assert "idle_in_transaction_session_timeout = '" in statement, statement
        for f in doc["findings"]:
            assert not _names_role(f, "good") and not _names_role(f, "batch"), f
            assert "good-app" not in json.dumps(f) and "batch-report" not in json.dumps(f)

        text = await run_cli("advise", "-c", config)
        assert text.rc == 0, text.stderr
        assert "leak  main: application 'leaky-app' (role leaky)" in text.stdout, text.stdout
        assert statement in text.stdout

        pg.psql(statement)
        again = await _advise(config)
        assert _by_id(again, IIT_FINDING) == [], again
        assert _by_id(again, "leak"), "the kills are still history: the leak stays named"

        # The same history with the target down: audit findings still printed, exit 1.
        down = tmp_path / "down.yaml"
        doc_down = yaml.safe_load(config.read_text())
        doc_down["targets"][0]["dsn"] = f"postgresql://watchdog@127.0.0.1:{free_port()}/postgres"
        down.write_text(yaml.safe_dump(doc_down))
        res = await run_cli("advise", "-c", down)
        assert res.rc == 1, (res.stdout, res.stderr)
        assert "leaky-app" in res.stdout and "unreachable" in res.stdout, res.stdout
        assert len(res.stderr.splitlines()) == 1 and "main:" in res.stderr, res.stderr
        unreachable = await _advise(down, rc=1)
        assert _by_id(unreachable, "leak") and "main" in unreachable["unreachable"]
    finally:
        for conn in kept:
            conn.terminate()
        pg.psql("ALTER ROLE leaky RESET ALL")


async def test_quiet_server_with_sensible_settings_has_no_findings(
    pg: TempCluster, make_cluster: Any, tmp_path: Path
) -> None:
    settings = {"reserved_connections": "3"} if pg.major >= 16 else {}
    quiet = make_cluster(pg.major, settings=settings)
    setup_roles(quiet)
    _roles(quiet)
    config = policy_file(tmp_path, quiet, idle="1h")  # the sweep below must act on nobody
    idle = [await connect(quiet, "good", "good-app") for _ in range(3)]
    try:
        for conn in idle:
            await conn.execute("SELECT 1")
        assert not (tmp_path / "audit.jsonl").exists()
        before = await _advise(config)  # no audit log yet: the live look alone speaks
        assert before["findings"] == [] and before["window"]["records"] == 0, before
        res = await run_cli("once", "-c", config, "--json")  # a sweep ran, and acted on nobody
        assert res.rc == 0 and res.json()["targets"][0]["actions"] == 0, res.stdout
        doc = await _advise(config)
        assert doc["findings"] == [], doc
        text = await run_cli("advise", "-c", config)
        assert text.rc == 0 and text.stdout.rstrip().endswith("no findings"), text.stdout
    finally:
        for conn in idle:
            conn.terminate()


async def test_bad_arguments_and_config_exit_2(pg: TempCluster, tmp_path: Path) -> None:
    config = policy_file(tmp_path, pg)
    res = await run_cli("advise", "-c", config, "--since", "yesterday-ish")
    assert res.rc == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    res = await run_cli("advise", "-c", config, "--target", "nope")
    assert res.rc == 2 and "unknown target" in res.stderr, res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: []\npolicies: []\n")
    res = await run_cli("advise", "-c", bad)
    assert res.rc == 2 and len(res.stderr.splitlines()) == 1, res.stderr


async def test_a_dry_run_then_the_real_kill_of_the_same_sessions_count_once(
    pg: TempCluster, tmp_path: Path
) -> None:
    setup_roles(pg)
    _roles(pg)
    audit = tmp_path / "audit.jsonl"
    config = policy_file(tmp_path, pg, idle="500ms", idle_in_transaction="1h")
    idle = [await connect(pg, "leaky", "leaky-app") for _ in range(8)]
    try:
        for conn in idle:
            await conn.execute("SELECT 1")
        await asyncio.sleep(0.6)  # past the threshold: no new statement may come
        dry = await run_cli("once", "-c", config, "--dry-run")
        assert dry.rc == 0, dry.stderr
        assert [r["outcome"] for r in read_audit(audit)] == ["would_terminate"] * 8
        real = await run_cli("once", "-c", config)
        assert real.rc == 0, real.stderr
        records = read_audit(audit)
        assert sorted(r["outcome"] for r in records) == ["terminated"] * 8 + ["would_terminate"] * 8
        assert len({(r["pid"], r["backend_start"]) for r in records}) == 8
    finally:
        for conn in idle:
            conn.terminate()
    doc = await _advise(config)
    [leak] = _by_id(doc, "leak")
    assert leak["evidence"][0].startswith("8 kills from "), leak
    assert "8 of the 8 kills on main" in leak["evidence"][0], leak
    assert any(e.startswith("8 more records of the same sessions counted once: a kill is one"
                            " session (pid and backend_start)") for e in leak["evidence"]), leak
    # Never the 16 records as 16 kills (a bare "16" could be the clock in a timestamp).
    assert not re.search(r"\b16 (kills|sessions|of)\b", json.dumps(leak)), leak
