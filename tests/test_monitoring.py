"""monitoring/: the alert rules under Prometheus's own promtool, and the dashboard's PromQL
against what a real `pg-watchdog run` exports on /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from daemon import Daemon, backend_alive, write_config
from helpers import connect, free_port, wait_for
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from scenario import setup_roles
from temppooler import start_pooler

from watchdog.commands.demo.tempcluster import TempCluster

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "monitoring" / "pg-watchdog.rules.yml"
RULE_TESTS = REPO / "tests" / "promtool" / "pg-watchdog.rules.test.yml"
PREDICT_LINEAR_TESTS = REPO / "tests" / "promtool" / "exhaustion-predict-linear.test.yml"
# Exported only while there is something to say (a growing client count): a real run that
# heals one idle session declares them (HELP, TYPE) without a sample.
ABSENT_UNTIL_NEEDED = {"pg_watchdog_exhaustion_eta_seconds"}
DASHBOARD = REPO / "monitoring" / "grafana-dashboard.json"
# Labels whose values are unbounded, or secrets: never on a metric.
HIGH_CARDINALITY = {"pid", "query", "application_name", "usename", "client_addr", "backend_start"}

_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                 "group_left", "group_right", "inf", "nan"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found (apt-get install prometheus)", pytrace=False)
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, format strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = m.group(0), text[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS or re.fullmatch(r"e\d*", word):
            continue
        names.add(word)
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(re.sub(r"^label_values\((.*),[^,]*\)$", r"\1", query["query"]))
    return exprs


def rule_exprs() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r["expr"] for g in groups for r in g["rules"]}


def test_promtool_checks_the_rules() -> None:
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in res.stdout


def test_promtool_unit_tests_pass() -> None:
    res = promtool("test", "rules", str(RULE_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def commented_alternative() -> str:
    """The predict_linear rule the rules file ships commented out, as a rules file of its own."""
    lines = RULES.read_text().splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.strip() == "# - alert: PgWatchdogExhaustionPredicted")
    block = []
    for line in lines[start:]:
        if not line.lstrip().startswith("#"):
            break
        block.append(line.replace("# ", "", 1) if line.strip() != "#" else "")
    return "groups:\n  - name: pg-watchdog-predict-linear\n    rules:\n" + "\n".join(block) + "\n"


def test_the_commented_predict_linear_alternative_is_a_valid_tested_rule(tmp_path: Path) -> None:
    rules = tmp_path / "exhaustion-predict-linear.rules.yml"
    rules.write_text(commented_alternative())
    res = promtool("check", "rules", str(rules))
    assert res.returncode == 0 and "SUCCESS: 1 rules found" in res.stdout, res.stdout + res.stderr
    tests = tmp_path / PREDICT_LINEAR_TESTS.name
    shutil.copy(PREDICT_LINEAR_TESTS, tests)
    res = promtool("test", "rules", str(tests))
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for t in tests:
        targets = {m.group(1) for s in t["input_series"]
                   for m in [re.search(r'target="([^"]*)"', s["series"])] if m}
        for case in t["alert_rule_test"]:
            name, alerts = case["alertname"], case["exp_alerts"]
            if alerts:
                fires.add(name)
                for a in alerts:
                    assert a["exp_annotations"]["summary"] and a["exp_annotations"]["description"]
            named = {a["exp_labels"].get("target") for a in alerts}
            if not alerts or targets - named:  # exact matching: the others stayed quiet
                quiet.add(name)
    assert fires == set(rule_exprs()), "alerts without a firing test"
    assert quiet == set(rule_exprs()), "alerts without a non-firing test"


def test_every_rule_names_the_target_and_a_runbook_step() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        if rule["alert"] != "PgWatchdogAbsent":  # no target left to name
            assert "{{ $labels.target }}" in notes["summary"], rule["alert"]
        assert "Runbook:" in notes["description"], rule["alert"]


def test_the_expression_parser_finds_metric_names() -> None:
    got = metric_names(
        'histogram_quantile(0.99, sum by (target, le) (rate(a_bucket{target=~"$target"}'
        "[$__rate_interval]))) / on (target) b > 1e3 and c unless absent(d)"
    )
    assert got == {"a_bucket", "b", "c", "d"}


def scrape(port: int) -> list[Metric]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return list(text_string_to_metric_families(response.read().decode()))


@pytest.fixture(scope="module")
def exported(pg: TempCluster, pgbouncer: Path, tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> list[Metric]:
    """The /metrics of a real `pg-watchdog run` that swept the cluster, with a real PgBouncer in
    front of it, and killed a session."""
    setup_roles(pg)
    tmp = tmp_path_factory.mktemp("monitoring")
    port = free_port()
    pooler = start_pooler(pg, binary=pgbouncer)
    request.addfinalizer(pooler.cleanup)
    cfg = write_config(tmp / "p.yaml", pg, idle="1s", interval="1s", pooler_dsn=pooler.dsn(),
                       extra=f"metrics:\n  listen: 127.0.0.1:{port}\n")

    async def run() -> list[Metric]:
        with Daemon(cfg) as daemon:
            victim = await connect(pg, "app", application_name="leaky")
            pid = await victim.fetchval("SELECT pg_backend_pid()")

            async def killed() -> bool:
                return not await backend_alive(pg, pid)

            await wait_for(killed, timeout=60, interval=0.2, what="the victim to be killed")
            victim.terminate()
            families: list[Metric] = []

            def counted() -> bool:
                nonlocal families
                try:
                    families = scrape(port)
                except OSError:
                    return False
                return any(s.name == "pg_watchdog_actions_total" and s.value >= 1
                           and s.labels.get("outcome") == "terminated"
                           for f in families for s in f.samples)

            await wait_for(counted, timeout=30, interval=0.2, what="the kill on /metrics")
            assert daemon.stop() == 0
            return families

    return asyncio.run(run())


def test_dashboard_names_only_exported_metrics(exported: list[Metric]) -> None:
    names = {s.name for f in exported for s in f.samples}
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert used, "no PromQL found in the dashboard"
    assert used <= names, f"not exported: {sorted(used - names)}"
    for needed in ("pg_watchdog_connections", "pg_watchdog_connection_slots",
                   "pg_watchdog_actions_total", "pg_watchdog_sweep_duration_seconds_bucket",
                   "pg_watchdog_leader", "pg_watchdog_target_up"):
        assert needed in used, needed


def test_rules_name_only_exported_metrics(exported: list[Metric]) -> None:
    names = {s.name for f in exported for s in f.samples}
    names |= {f.name for f in exported if f.name in ABSENT_UNTIL_NEEDED}  # declared, no sample
    used = set().union(*(metric_names(e) for e in rule_exprs().values()))
    missing = used - names
    assert not missing, f"not exported: {sorted(missing)}"


def test_metrics_follow_prometheus_conventions(exported: list[Metric]) -> None:
    assert exported
    for family in exported:
        assert family.name.startswith("pg_watchdog_"), family.name
        labels = {k for s in family.samples for k in s.labels}
        assert not labels & HIGH_CARDINALITY, (family.name, labels)
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram" or "timestamp" in family.name or "interval" in family.name:
            assert family.name.endswith("_seconds"), family.name
    kinds = {f.name: f.type for f in exported}
    assert kinds["pg_watchdog_actions"] == "counter"
    assert kinds["pg_watchdog_last_sweep_timestamp_seconds"] == "gauge"
    assert kinds["pg_watchdog_interval_seconds"] == "gauge"


def test_first_failure_is_visible_to_increase(exported: list[Metric]) -> None:
    # Alert rules use increase(): a failed/unconfirmed series must exist at 0 before its first.
    actions = next(f for f in exported if f.name == "pg_watchdog_actions")
    seen = {(s.labels["policy"], s.labels["outcome"]) for s in actions.samples
            if s.name.endswith("_total")}
    assert {("idle", "failed"), ("idle", "unconfirmed")} <= seen
