"""`pg-watchdog init`'s pure parts: the YAML it writes from what it saw (hostile names
included), the thresholds it fits, the DSN without secrets. No server needed."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import yaml

from watchdog.commands.init.dsn import without_secrets
from watchdog.commands.init.fit import (
    alert_percent,
    escalation_percent,
    glob_exact,
    thresholds,
    tools,
)
from watchdog.commands.init.look import AppSeen, Facts, Timeout
from watchdog.commands.init.render import Options, render, scalar
from watchdog.config import conninfo
from watchdog.config.policy import parse_config
from watchdog.config.units import parse_duration
from watchdog.config.units import policy_duration as duration
from watchdog.config.yamlpos import load_yaml
from watchdog.core.roles import Role, RoleFacts

HOSTILE = [
    "x\n  - evil",
    "a\"b'c",
    "x: y",
    "- item",
    "#not a comment",
    "\x1b[31mred",
    "rtl\u202eevil",
    "",
    "yes",
    "123",
    "*",
    "[x]",
    "a\r\nb: c",
    "trail ",
    "\u2028line",
    "\\x0a  - escaped by PostgreSQL 16+",
]


def facts(**kw: Any) -> Facts:
    base = Facts(
        server="127.0.0.1:5432", version="18.6", version_num=180006, in_recovery=False,
        max_connections=100, superuser_reserved=3, reserved=0, capacity=97, peak_used=20,
        role="watchdog", rolsuper=False, sees_all=True, can_signal=True, use_reserved=True,
        superusers=("postgres",), roles=RoleFacts(frozenset(), ()), apps=(), listeners={},
        replication={}, addrs={},
        timeouts=(Timeout("idle_session_timeout", 0.0, "default"),
                  Timeout("idle_in_transaction_session_timeout", 0.0, "default"),
                  Timeout("transaction_timeout", 0.0, "default")),
        role_timeouts=(), samples=7, seconds=3.0,
    )
    return dataclasses.replace(base, **kw)


def app(name: str, n: int = 1, user: str = "app") -> AppSeen:
    return AppSeen(name, n, {"idle": n}, (user,), ("10.0.0.5",))


def written(f: Facts, **kw: Any) -> tuple[str, dict[str, Any]]:
    o = Options(dsn=kw.pop("dsn", "postgresql://watchdog@db1:5432/postgres"),
                removed=kw.pop("removed", ()), **kw)
    text = render(f, o, datetime(2026, 5, 1, 10, 0, tzinfo=UTC))
    doc = yaml.safe_load(text)
    parse_config(load_yaml(text, "init.yaml", {}), "init.yaml")  # check accepts it
    return text, doc


# -- the emitter ------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE)
def test_scalar_is_one_line_that_reads_back_as_the_value(value: str) -> None:
    text = scalar(value)
    assert "\n" not in text and "\r" not in text
    assert text.isascii() and text.isprintable()
    assert yaml.safe_load(f"key: {text}") == {"key": value}
    assert yaml.safe_load(f"- {text}   # a comment") == [value]


@pytest.mark.parametrize("name", ["psql", "a*b", "x?y", "[z]", "DBeaver 24 - Main <db>"])
def test_glob_exact_matches_only_that_name(name: str) -> None:
    assert fnmatchcase(name, glob_exact(name))
    assert not fnmatchcase(name + "x", glob_exact(name))


@pytest.mark.parametrize("seconds", [0.5, 1, 5, 96, 600, 3600 + 1800, 90061.25])
def test_durations_read_back(seconds: float) -> None:
    assert parse_duration(duration(seconds)) == pytest.approx(seconds)


# -- hostile names cannot change the file's structure ---------------------------------


def test_hostile_role_and_application_names_stay_values_or_comments() -> None:
    supers = tuple(HOSTILE[:6])
    apps = tuple(app(n, i + 1, user=HOSTILE[-i - 1]) for i, n in enumerate(HOSTILE))
    apps += (app("DBeaver\n  - evil"), app("psql"))
    f = facts(superusers=supers, apps=apps, listeners={HOSTILE[0]: 1},
              replication={f"walsender ({HOSTILE[1]})": 1}, server="x\n- y:5432",
              role_timeouts=((HOSTILE[0], HOSTILE[1], "idle_session_timeout", "5min\nz: 1"),),
              roles=RoleFacts(frozenset({"rds_superuser"}),
                              (Role(HOSTILE[0], False, True, False, False, ("rds_superuser",)),)))
    text, doc = written(f, target="main", audit_path="/tmp/a\n  b.jsonl")
    assert set(doc) == {"dry_run", "targets", "exclude", "policies", "limits", "audit", "alerts"}
    assert set(doc["exclude"]) == {"superusers", "member_of", "users", "applications",
                                   "databases", "client_addrs", "listeners", "pooled"}
    assert doc["exclude"]["users"] == []
    assert doc["exclude"]["applications"] == [t.glob for t in tools(f)[0]]
    assert "DBeaver*" in doc["exclude"]["applications"]  # the glob covers the hostile one too
    assert [p["name"] for p in doc["policies"]] == ["idle", "idle-in-transaction"]
    assert doc["audit"]["path"] == "/tmp/a\n  b.jsonl"
    assert doc["dry_run"] is True
    for line in text.splitlines():
        assert line.isascii() and line.isprintable(), repr(line)


def test_a_password_never_reaches_the_file_but_a_password_file_comment_does() -> None:
    dsn, removed = without_secrets("postgresql://watchdog:S3cr%40t@db1/postgres")
    text, doc = written(facts(), dsn=dsn, removed=removed, target="orders")
    assert "S3cr" not in text
    assert doc["targets"][0]["dsn"] == "postgresql://watchdog@db1/postgres"
    assert "password_file" not in doc["targets"][0]
    assert "# password_file: /etc/pg-watchdog/orders.password" in text


@pytest.mark.parametrize("dsn, kept", [
    ("postgresql://u:pw@h:5433/db?sslmode=require&sslpassword=kp",
     {"user": "u", "host": "h", "port": "5433", "dbname": "db", "sslmode": "require"}),
    ("host=h user=u password='a b\\'c' dbname=d", {"host": "h", "user": "u", "dbname": "d"}),
    ("postgresql:///db?host=/var/run/postgresql&password=p",
     {"host": "/var/run/postgresql", "dbname": "db"}),
    ("postgresql://u@[::1]:5433,h2:5434/db", {"user": "u", "host": "::1,h2", "port": "5433,5434",
                                               "dbname": "db"}),
])
def test_the_dsn_keeps_everything_but_its_secrets(dsn: str, kept: dict[str, str]) -> None:
    text, removed = without_secrets(dsn)
    assert {k: p.value for k, p in conninfo.validate(text).items()} == kept
    assert "pw" not in text and "kp" not in text and "a b" not in text
    assert set(removed) == {k for k in ("password", "sslpassword") if k in dsn}


# -- what it fits ------------------------------------------------------------------------


def test_tools_are_proposed_one_a_line_and_the_rest_listed_to_judge() -> None:
    f = facts(apps=(app("orders-api", 14), app("psql", 2), app("DBeaver 24.1.0 - Main <db>"),
                    app("pg_dump"), app("pgAdmin 4 - DB:postgres"), app("dbeaver-lowercase"),
                    app("reporting")))
    _, judged = tools(f)
    text, doc = written(f)
    apps = doc["exclude"]["applications"]
    assert {"psql", "pg_dump*", "DBeaver*", "pgAdmin*", "pg_basebackup"} <= set(apps)
    assert glob_exact("dbeaver-lowercase") in apps  # the glob is case-sensitive: exactly it
    assert [a.name for a in judged] == ["orders-api", "reporting"]
    assert "  #   orders-api: 14 (14 idle), role app, from 10.0.0.5" in text
    for glob in apps:
        assert any(line.strip().startswith(f"- {scalar(glob)}   # ") for line in text.splitlines())


@pytest.mark.parametrize("server_s, fitted", [(120.0, 96.0), (3600.0, 300.0)])
def test_thresholds_stay_clear_of_the_servers_own_timeouts(server_s: float, fitted: float) -> None:
    f = facts(timeouts=(Timeout("idle_session_timeout", 0.0, "default"),
                        Timeout("idle_in_transaction_session_timeout", server_s * 1000,
                                "configuration file"),
                        Timeout("transaction_timeout", None, "")))
    idle, iit = thresholds(f, None, None)
    assert idle.seconds == 600.0 and not idle.notes
    assert iit.seconds == fitted and iit.notes
    text, doc = written(f)
    assert doc["policies"][1]["longer_than"] == duration(fitted)
    assert "transaction_timeout: not in PostgreSQL 18.6" in text


def test_transaction_timeout_counts_for_idle_in_transaction() -> None:
    f = facts(timeouts=(Timeout("idle_session_timeout", 60_000.0, "configuration file"),
                        Timeout("idle_in_transaction_session_timeout", 0.0, "default"),
                        Timeout("transaction_timeout", 90_000.0, "configuration file")))
    idle, iit = thresholds(f, None, None)
    assert (idle.seconds, iit.seconds) == (48.0, 72.0)
    idle, iit = thresholds(f, 5.0, 3.0)  # explicit thresholds under the server's are kept
    assert (idle.seconds, iit.seconds) == (5.0, 3.0)
    idle, _ = thresholds(f, 120.0, None)  # above it: kept, and said to be pointless
    assert idle.seconds == 120.0 and "will see none" in idle.notes[0]


@pytest.mark.parametrize("capacity, pct", [(57, 89), (17, 82), (997, 89), (5, 50)])
def test_escalation_leaves_about_a_tenth_of_the_slots(capacity: int, pct: int) -> None:
    assert escalation_percent(capacity) == pct


def test_a_server_already_near_80_percent_gets_a_higher_alert_level() -> None:
    assert alert_percent(facts(peak_used=20)) == 80
    assert alert_percent(facts(peak_used=80)) == 88  # 83 % of 97 now
    assert alert_percent(facts(peak_used=97)) == 95


def test_a_pooler_in_front_gets_a_commented_poolers_block() -> None:
    f = facts(apps=(app("pgbouncer"), app("web", 12)), addrs={"10.0.0.9": 12, "127.0.0.1": 40})
    text, doc = written(f)
    assert "poolers" not in doc["targets"][0]
    block = [line for line in text.splitlines()
             if line.startswith(("    # poolers:", "    #   - name: pgb", "    #     dsn:"))]
    assert block == ["    # poolers:", "    #   - name: pgb1",
                     "    #     dsn: postgresql://watchdog@10.0.0.9:6432/pgbouncer"]
    uncommented = "\n".join(line.replace("# ", "", 1) for line in block)
    assert yaml.safe_load(uncommented) == {"poolers": [
        {"name": "pgb1", "dsn": "postgresql://watchdog@10.0.0.9:6432/pgbouncer"}]}


def test_a_managed_layout_and_a_standby_are_named() -> None:
    f = facts(in_recovery=True, roles=RoleFacts(
        frozenset({"rds_superuser", "rdsadmin"}),
        (Role("dbadmin", False, True, True, False, ("rds_superuser",)),)))
    text, doc = written(f)
    assert "Amazon RDS/Aurora layout (role rdsadmin exists)" in text
    assert "members now: dbadmin (rds_superuser)" in text
    assert "rds_superuser" in doc["exclude"]["member_of"]
    assert "hot standby" in text


def test_the_metrics_block_is_commented_on_a_port_no_exporter_uses(tmp_path: Path) -> None:
    text, doc = written(facts())
    assert "metrics" not in doc
    assert "#   listen: 127.0.0.1:9654" in text and "9187" in text  # said why not 9187
