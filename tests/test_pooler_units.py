"""The PgBouncer pieces that need no server: the policy file, attribution, decide, audit review."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from test_decide_table import (
    DEFAULT_EXCLUDE,
    assert_acted,
    assert_spared,
    config,
    policy,
    session,
    snapshot,
)

from watchdog.audit.log import make_record
from watchdog.commands.audit import configure_parser, run
from watchdog.config.policy import Exclusions, PoolerConfig, load_config
from watchdog.config.yamlfields import cidr
from watchdog.config.yamlpos import ConfigError, YNode
from watchdog.core.decide import decide
from watchdog.core.model import ClientUnknown, Outcome, PoolerClient, PoolerLink
from watchdog.pgbouncer.console import PoolerLook, Socket, attribute, psycopg_missing
from watchdog.pgbouncer.rows import POOLS, SOCKETS, AnswerError, Rows

# -- the policy file --------------------------------------------------------------------------

HEAD = """\
targets:
  - name: main
    dsn: postgresql://watchdog@127.0.0.1:5432/postgres
"""
POLICIES = """\
policies:
  - name: idle
    state: idle
    longer_than: 10m
"""


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    return load_config(str(path), environ={})


def test_poolers_load_with_their_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, HEAD + """\
    poolers:
      - name: pgb1
        dsn: postgresql://watchdog@10.0.0.5:6432/pgbouncer
      - name: pgb2
        dsn: postgresql://watchdog@10.0.0.6:6432/pgbouncer
""" + POLICIES)
    assert cfg.targets[0].poolers == (  # type: ignore[attr-defined]
        PoolerConfig("pgb1", "postgresql://watchdog@10.0.0.5:6432/pgbouncer"),
        PoolerConfig("pgb2", "postgresql://watchdog@10.0.0.6:6432/pgbouncer"),
    )
    assert cfg.exclude.pooled is True  # type: ignore[attr-defined]
    assert cfg.policies[0].exclude.pooled is False  # type: ignore[attr-defined]
    assert cfg.alerts.pooler_wait_above == 1.0  # type: ignore[attr-defined]


def test_pooled_and_pooler_wait_above_can_be_set(tmp_path: Path) -> None:
    cfg = load(tmp_path, HEAD + POLICIES + """\
    exclude: {pooled: true}
exclude:
  pooled: false
alerts:
  pooler_wait_above: 250ms
""")
    assert cfg.exclude.pooled is False  # type: ignore[attr-defined]
    assert cfg.policies[0].exclude.pooled is True  # type: ignore[attr-defined]
    assert cfg.alerts.pooler_wait_above == 0.25  # type: ignore[attr-defined]


@pytest.mark.parametrize(("poolers", "where", "message"), [
    ("[{name: pgb1, dsn: postgresql://w@h:6432/pgbouncer},"
     " {name: pgb1, dsn: postgresql://w@h2:6432/pgbouncer}]",
     "4:74: targets[0].poolers[1].name:", "duplicate pooler name 'pgb1'"),
    ("[{name: 'pg b', dsn: postgresql://w@h:6432/pgbouncer}]", "targets[0].poolers[0].name:",
     "not a valid name"),
    ("[{name: pgb1, dsn: 'http://h:6432/pgbouncer'}]", "targets[0].poolers[0].dsn:",
     "postgresql://"),
    ("[{name: pgb1, dsn: postgresql://w@h:6432/postgres}]", "targets[0].poolers[0].dsn:",
     "admin database pgbouncer, not 'postgres'"),
    ("[{name: pgb1}]", "targets[0].poolers[0]", "dsn"),
    ("[{name: pgb1, dsn: postgresql://w@h/pgbouncer, pool: x}]", "targets[0].poolers[0]", "pool"),
    ("{name: pgb1, dsn: postgresql://w@h/pgbouncer}", "targets[0].poolers:", "must be a list"),
])
def test_invalid_poolers_are_rejected_with_their_position(
    tmp_path: Path, poolers: str, where: str, message: str
) -> None:
    text = HEAD + f"    poolers: {poolers}\n" + POLICIES
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert where in str(info.value), str(info.value)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("command", [["check"], ["once"], ["status"], ["run"]])
def test_without_psycopg_the_commands_say_how_to_get_it(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(HEAD + """\
    poolers: [{name: pgb1, dsn: postgresql://w@h:6432/pgbouncer}]
""" + POLICIES + f"audit: {{path: {tmp_path / 'audit.jsonl'}}}\n")
    # A None entry in sys.modules makes `import psycopg` fail as if it were not installed.
    code = (
        "import sys; sys.modules['psycopg'] = None; from watchdog.commands.cli import main;"
        f" sys.exit(main({[*command, '-c', str(path)]!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2, proc
    assert proc.stderr == (
        "pg-watchdog: targets name PgBouncer poolers, but psycopg is not installed:"
        " pip install 'pg-watchdog[pgbouncer]' (psycopg 3)\n"
    )


def test_psycopg_missing_says_only_when_poolers_are_named(tmp_path: Path) -> None:
    with_poolers = load(tmp_path, HEAD + """\
    poolers: [{name: pgb1, dsn: postgresql://w@h:6432/pgbouncer}]
""" + POLICIES)
    without = load(tmp_path, HEAD + POLICIES)
    assert psycopg_missing(without) is None  # type: ignore[arg-type]
    assert psycopg_missing(with_poolers) is None  # type: ignore[arg-type]  # installed here


# -- attribution -------------------------------------------------------------------------------


def sock(kind: str, ptr: str, link: str = "", *, addr: str = "10.2.3.4", port: int = 51234,
         local_addr: str = "127.0.0.1", local_port: int = 40000, pid: int = 0,
         state: str = "") -> Socket:
    return Socket(kind, "app", "appdb", state, addr, port, local_addr, local_port,
                  "2026-11-25 11:59:00 UTC", ptr, link, pid, "web - 10.2.3.4:51234")


def test_backends_are_matched_by_pid_and_both_socket_ends() -> None:
    look = PoolerLook("pgb1", (
        sock("C", "0xc1", "0xs1", state="cl_active"),
        sock("S", "0xs1", "0xc1", addr="127.0.0.1", port=5432, local_port=40001, pid=101,
             state="sv_active"),
        sock("S", "0xs2", addr="127.0.0.1", port=5432, local_port=40002, pid=102, state="sv_idle"),
        # Same pid and port, but towards another server (port 5433): not ours.
        sock("S", "0xs3", addr="127.0.0.1", port=5433, local_port=40003, pid=103),
    ), 100)
    sessions = [
        session(101, addr="127.0.0.1")._replace(client_port=40001),
        session(102, addr="127.0.0.1")._replace(client_port=40002),
        session(103, addr="127.0.0.1")._replace(client_port=40003),
        session(104, addr="127.0.0.1")._replace(client_port=40002),  # another pid on that port
    ]
    links = attribute([look], sessions, "127.0.0.1:5432")
    assert set(links) == {101, 102}
    assert links[102] == PoolerLink("pgb1", None)
    client = links[101].client
    assert client is not None
    assert (client.addr, client.port, client.user, client.database) == (
        "10.2.3.4", 51234, "app", "appdb")
    assert client.connect_time == "2026-11-25T11:59:00.000Z"


def test_a_link_to_a_dropped_client_row_is_unknown_not_pooled() -> None:
    look = PoolerLook("pgb1", (
        sock("S", "0xs1", "0xc9", addr="127.0.0.1", port=5432, local_port=40001, pid=101),
    ), 100)
    links = attribute([look], [session(101, addr="127.0.0.1")._replace(client_port=40001)],
                      "127.0.0.1:5432")
    assert links[101] == PoolerLink("pgb1", None, ClientUnknown.INCOMPLETE)


def test_an_old_answer_names_only_the_backends_unchanged_since() -> None:
    look = PoolerLook("pgb1", (
        sock("C", "0xc1", "0xs1", state="cl_active"),
        sock("S", "0xs1", "0xc1", addr="127.0.0.1", port=5432, local_port=40001, pid=101),
    ), 100)
    base = session(101, addr="127.0.0.1")._replace(client_port=40001)
    read_at = base.state_change
    assert read_at is not None and base.backend_start is not None
    later = read_at + timedelta(seconds=1)
    old = replace(look, as_of=read_at)
    assert 101 in attribute([old], [base], "127.0.0.1:5432")
    # The same pid and port, a newer backend: a pid reused, not the client the answer names.
    reborn = base._replace(backend_start=later, state_change=later)
    assert attribute([old], [reborn], "127.0.0.1:5432") == {}
    # A new transaction since the answer: PgBouncer may have linked another client.
    relinked = base._replace(state_change=later, xact_start=later)
    assert attribute([old], [relinked], "127.0.0.1:5432") == {}
    # Statements within a transaction begun before the answer keep its client.
    same = base._replace(state_change=later, xact_start=read_at)
    assert 101 in attribute([old], [same], "127.0.0.1:5432")


def raw_sockets(*rows: dict[str, bytes | None]) -> Rows[Socket]:
    names = ["type", "user", "database", "state", "addr", "port", "local_addr", "local_port",
             "connect_time", "ptr", "link", "remote_pid", "application_name"]
    good = {"type": b"S", "user": b"app", "database": b"db", "state": b"sv_active",
            "addr": b"127.0.0.1", "port": b"5432", "local_addr": b"127.0.0.1",
            "local_port": b"40001", "connect_time": b"2026-11-25 11:59:00 UTC",
            "ptr": b"0x55d1c2", "link": b"", "remote_pid": b"101", "application_name": b"web"}
    out = Rows(SOCKETS)
    out.columns(names)
    assert out.picks is not None
    ordered = [names[i] for i in out.picks if i is not None]
    out.feed([tuple({**good, **r}[n] for n in ordered) for r in rows])
    return out


@pytest.mark.parametrize("bad", [
    {"port": b"abc"}, {"port": b"70000"}, {"remote_pid": b"-1"}, {"remote_pid": b"1e9"},
    {"remote_pid": b"99999999999"}, {"type": b"X"}, {"ptr": b"'; DROP"}, {"link": b"0xZZ"},
    {"addr": b"not-an-ip"}, {"local_addr": None}, {"state": b"sv active\n"},
    {"application_name": b"x" * 5000}, {"connect_time": b"t" * 100}, {"port": None},
])
def test_a_row_of_the_wrong_types_is_dropped_and_counted(bad: dict[str, bytes | None]) -> None:
    rows = raw_sockets({}, bad, {"ptr": b"0xab"})
    assert rows.dropped == 1
    assert [r.ptr for r in rows.rows] == ["0x55d1c2", "0xab"]
    assert rows.rows[0].port == 5432 and rows.rows[0].remote_pid == 101


def test_an_answer_without_the_columns_it_needs_does_not_fit() -> None:
    rows = Rows(SOCKETS)
    with pytest.raises(AnswerError, match="lacks remote_pid"):
        rows.columns(["type", "state", "addr", "port", "local_addr", "local_port", "ptr", "link"])
    with pytest.raises(AnswerError, match="repeats a column"):
        Rows(POOLS).columns(["database", "user", "user"])


def test_pools_holding_nobody_are_left_out_and_waits_add_up() -> None:
    rows = Rows(POOLS)
    rows.columns(["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle",
                  "sv_used", "maxwait", "maxwait_us"])
    rows.feed([
        (b"postgres", b"app", b"2", b"1", b"1", b"1", b"0", b"1", b"500000"),
        (b"chosen-by-a-login", b"app", b"0", b"0", b"0", b"0", b"0", b"0", b"0"),
        (b"db", b"app", b"x", b"0", b"0", b"0", b"0", b"0", b"0"),
    ])
    assert rows.dropped == 1
    [pool, empty] = rows.rows
    assert (pool.cl_active, pool.cl_waiting, pool.maxwait_s) == (2, 1, 1.5)
    assert empty.empty and not pool.empty


# -- decide ------------------------------------------------------------------------------------

REAL = PoolerClient("10.9.8.7", 40123, "app", "appdb", "web", "2026-11-25T11:00:00.000Z")


def test_unlinked_pooled_backend_is_spared_by_default() -> None:
    snap = replace(snapshot(session(100), session(101)), pooled={100: PoolerLink("pgb1")})
    cfg = replace(config(), exclude=replace(DEFAULT_EXCLUDE, pooled=True))
    decision = decide(snap, cfg, "main")
    assert_spared(decision, 100, "pooled by pgb1 (no client)")
    assert_acted(decision, 101)


def test_exclude_pooled_false_lets_the_pool_be_killed() -> None:
    snap = replace(snapshot(session(100)), pooled={100: PoolerLink("pgb1")})
    decision = decide(snap, config(), "main")  # DEFAULT_EXCLUDE: pooled=False
    assert_acted(decision, 100)
    assert decision.actions[0].link == PoolerLink("pgb1")


def test_a_policy_of_its_own_may_spare_pooled_backends() -> None:
    spare = policy(exclude=Exclusions(pooled=True))
    snap = replace(snapshot(session(100)), pooled={100: PoolerLink("pgb1")})
    decision = decide(snap, config(spare), "main")
    assert decision.actions == ()


def test_linked_backend_is_killable_with_its_client() -> None:
    iit = session(100, state="idle in transaction", xact_for=3600)
    snap = replace(snapshot(iit), pooled={100: PoolerLink("pgb1", REAL)})
    cfg = replace(config(policy("iit", ("idle in transaction",))),
                  exclude=replace(DEFAULT_EXCLUDE, pooled=True))
    decision = decide(snap, cfg, "main")
    assert_acted(decision, 100, by="iit")
    assert decision.actions[0].link == PoolerLink("pgb1", REAL)


def net(text: str) -> object:
    return cidr(YNode(text, "t", 1, 1, "x"))


def test_client_addrs_match_the_real_client_as_well_as_the_backend() -> None:
    pooled = {100: PoolerLink("pgb1", REAL), 101: PoolerLink("pgb1", REAL)}
    snap = replace(snapshot(session(100, addr="127.0.0.1"), session(101, addr="127.0.0.1"),
                            session(102, addr="10.9.8.7")), pooled=pooled)
    ex = replace(DEFAULT_EXCLUDE, client_addrs=(net("10.9.8.0/24"),))
    decision = decide(snap, config(exclude=ex), "main")
    for pid in (100, 101, 102):
        assert_spared(decision, pid, "excluded client address 10.9.8.7")
    # A policy limited to the batch host's network acts on its pooled backends too.
    only = policy(client_addrs=(net("10.9.8.0/24"),))
    decision = decide(replace(snap, pooled={100: PoolerLink("pgb1", REAL)}),
                      config(only), "main")
    assert sorted(a.session.pid for a in decision.actions) == [100, 102]
    # And the backend's own address still counts: PgBouncer's host.
    by_backend = policy(client_addrs=(net("127.0.0.1/32"),))
    decision = decide(snap, config(by_backend), "main")
    assert sorted(a.session.pid for a in decision.actions) == [100, 101]


# -- audit records and review ------------------------------------------------------------------


def records_for(*links: PoolerLink | None) -> list[dict[str, object]]:
    out = []
    for i, link in enumerate(links):
        s = session(100 + i, addr="127.0.0.1")._replace(client_port=40000 + i)
        snap = replace(snapshot(s), pooled={} if link is None else {s.pid: link})
        [action] = decide(snap, config(), "main").actions
        out.append(make_record(Outcome(action, "terminated"), server="db:5432", sweep="s",
                               query=action.session.query))
    return out


def test_records_carry_the_pooler_and_its_client() -> None:
    linked, unlinked, direct = records_for(PoolerLink("pgb1", REAL), PoolerLink("pgb1"), None)
    assert linked["pooler"] == "pgb1"
    assert linked["pooler_client"] == {
        "addr": "10.9.8.7", "port": 40123, "user": "app", "database": "appdb",
        "application_name": "web", "connect_time": "2026-11-25T11:00:00.000Z",
    }
    assert (unlinked["pooler"], unlinked["pooler_client"]) == ("pgb1", None)
    assert (direct["pooler"], direct["pooler_client"]) == (None, None)


def audit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    code = run(parser.parse_args(list(argv)), lambda _: Path("/nonexistent"))
    out, err = capsys.readouterr()
    return code, out, err


def test_audit_filters_and_counts_by_the_real_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    recs = records_for(PoolerLink("pgb1", REAL), PoolerLink("pgb1"), None)
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    code, out, _ = audit(capsys, "--file", str(log), "--client-addr", "10.9.8.0/24", "--json")
    assert code == 0
    assert [json.loads(line)["pid"] for line in out.splitlines()] == [100]
    code, out, _ = audit(capsys, "--file", str(log), "--client-addr", "127.0.0.1", "--json")
    assert [json.loads(line)["pid"] for line in out.splitlines()] == [101, 102]
    code, out, _ = audit(capsys, "--file", str(log), "--summary", "--json")
    assert json.loads(out)["by_client"] == {"127.0.0.1": 2, "10.9.8.7": 1}
    code, _, err = audit(capsys, "--file", str(log), "--client-addr", "10.0.0.0/33")
    assert code == 2
    assert err.strip() == "pg-watchdog: --client-addr: '10.0.0.0/33' is not an address or CIDR"


# -- a pooler that cannot be read, and when a pooler is worth reading --------------------------


def test_a_backend_of_an_unreadable_pooler_is_spared_whatever_the_exclusions() -> None:
    unknown = PoolerLink("pgb1", None, ClientUnknown.UNREADABLE)
    snap = replace(snapshot(session(100), session(101)), pooled={100: unknown})
    for pooled in (True, False):
        cfg = replace(config(), exclude=replace(DEFAULT_EXCLUDE, pooled=pooled))
        decision = decide(snap, cfg, "main")
        assert_spared(decision, 100, "pooler pgb1 unreadable: real client unknown")
        assert_acted(decision, 101)


def test_candidates_are_judged_without_the_real_client() -> None:
    from watchdog.core.candidates import candidates, horizon

    far = session(100, idle_for=60)  # 10 min policy: 9 min to go
    near = session(101, idle_for=590)  # 10 s to go: within a 30 s horizon
    due = session(102, idle_for=601)
    boss = session(103, idle_for=3600, rolsuper=True)  # spared whoever its client is
    listed = session(104, idle_for=3600, addr="10.9.8.7")  # excluded by address: may be pooled
    ex = replace(DEFAULT_EXCLUDE, superusers=True, client_addrs=(net("10.9.8.0/24"),))
    cfg = config(policy(), exclude=ex)
    snap = snapshot(far, near, due, boss, listed)
    main = cfg.target("main")
    assert horizon(cfg, main) == 30.0
    found = {c.session.pid: c for c in candidates(snap, cfg, "main", horizon(cfg, main))}
    assert set(found) == {101, 102, 104}
    assert not found[101].due_now and found[102].due_now
    assert {c.session.pid for c in candidates(snap, cfg, "main", 0.0)} == {102, 104}
