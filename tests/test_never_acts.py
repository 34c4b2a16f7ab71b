"""A policy whose filters select only sessions the exclusions spare can never act: `check` and
`run` say so in one line each (a warning; the file is valid). The rule is a pure function over
the Config, checked here table-driven, then through the real commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from daemon import Daemon
from helpers import sweeps_ran
from scenario import setup_roles

from watchdog.commands.demo.tempcluster import TempCluster
from watchdog.config.policy import Config, parse_config
from watchdog.config.yamlpos import load_yaml
from watchdog.core.unreachable import never_acts

ADMINS = (
    "policy 'p' never acts: every role its member_of selects (rds_superuser) is spared by"
    " exclude.member_of, which lists the managed services' admin roles unless the file sets it"
)


def config(policy: str, exclude: str = "") -> Config:
    text = (
        "targets: [{name: main}]\n"
        f"policies:\n  - {{name: p, state: idle, longer_than: 1m, {policy}}}\n"
    )
    if exclude:
        text += f"exclude: {{{exclude}}}\n"
    return parse_config(load_yaml(text, "p.yaml", {}), "p.yaml")


CASES = [
    # policy filter, global exclude, expected warning (None: it can act)
    ("member_of: [rds_superuser]", "", ADMINS),  # exclude.member_of left out: the default
    ("member_of: [rds_superuser]", "superusers: true", ADMINS),
    ("member_of: [rds_superuser]", "member_of: []", None),
    ("member_of: [rds_superuser, app_admins]", "", None),
    (
        "member_of: [app_admins]",
        "member_of: [app_admins]",
        "policy 'p' never acts: every role its member_of selects (app_admins) is spared by"
        " exclude.member_of",
    ),
    (
        "member_of: [app_admins], exclude: {member_of: [app_admins]}",
        "",
        "policy 'p' never acts: every role its member_of selects (app_admins) is spared by"
        " exclude.member_of",
    ),
    (
        "applications: [psql]",
        "applications: ['pg_dump*', psql]",
        "policy 'p' never acts: every name its applications selects (psql) is spared by"
        " exclude.applications",
    ),
    ("applications: [pg_dump_nightly, app]", "applications: ['pg_dump*']", None),
    (
        "applications: [pg_dump_nightly]",
        "applications: ['pg_dump*']",
        "policy 'p' never acts: every name its applications selects (pg_dump_nightly) is spared"
        " by exclude.applications",
    ),
    ("applications: ['pg_*']", "applications: ['pg_dump*']", None),  # pg_basebackup can match
    (
        "applications: ['batch-*']",
        "applications: ['batch-*']",
        "policy 'p' never acts: every name its applications selects (batch-*) is spared by"
        " exclude.applications",
    ),
    (
        "users: [bob], exclude: {users: [bob]}",
        "",
        "policy 'p' never acts: every name its users selects (bob) is spared by exclude.users",
    ),
    (
        "databases: [sales]",
        "databases: ['*']",
        "policy 'p' never acts: every name its databases selects (sales) is spared by"
        " exclude.databases",
    ),
    (
        "client_addrs: [10.1.0.0/16]",
        "client_addrs: [10.0.0.0/8]",
        "policy 'p' never acts: every address its client_addrs selects (10.1.0.0/16) is spared"
        " by exclude.client_addrs",
    ),
    ("client_addrs: [10.0.0.0/8]", "client_addrs: [10.1.0.0/16]", None),
    ("client_addrs: ['::ffff:10.0.0.0/104']", "client_addrs: [10.0.0.0/8]", None),
    ("users: [app]", "", None),
]


@pytest.mark.parametrize(("policy", "exclude", "expected"), CASES)
def test_never_acts(policy: str, exclude: str, expected: str | None) -> None:
    assert never_acts(config(policy, exclude)) == ([expected] if expected else [])


def test_the_seed_policies_all_act() -> None:
    from watchdog.config.policy import load_config

    seed = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"
    assert never_acts(load_config(str(seed), environ={})) == []


def _file(path: Path, dsn: str) -> Path:
    path.write_text(
        f"""
targets: [{{name: main, dsn: "{dsn}", interval: 1s}}]
policies:
  - {{name: idle, state: idle, longer_than: 10m}}
  - {{name: p, state: idle, longer_than: 1m, member_of: [rds_superuser]}}
audit: {{path: "{path.parent / "audit.jsonl"}"}}
"""
    )
    return path


def test_check_warns_in_one_line_and_passes(tmp_path: Path) -> None:
    cfg = _file(tmp_path / "p.yaml", "postgresql://watchdog@127.0.0.1:1/postgres")
    proc = subprocess.run(
        [sys.executable, "-m", "watchdog", "check", "-c", str(cfg)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{cfg}: ok (1 targets, 2 policies")
    assert proc.stderr == f"pg-watchdog: warning: {ADMINS}\n"


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    return pg


async def test_run_warns_in_one_line(cluster: TempCluster, tmp_path: Path) -> None:
    cfg = _file(tmp_path / "p.yaml", cluster.dsn("watchdog"))
    with Daemon(cfg) as d:
        await sweeps_ran(cluster, 2)
        assert d.stop() == 0
    lines = [x for x in d.log().splitlines() if "never acts" in x]
    assert len(lines) == 1 and lines[0].endswith(ADMINS), lines
    assert "WARNING" in lines[0]
